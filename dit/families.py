"""The two families of video models linvid trains, behind what train.py and sample.py need from them.

* ``dit`` — linvid's own class-conditional video DiT (:mod:`dit.model`), trained from scratch.
* ``wan`` — a pretrained diffusers Wan2.1 text-to-video transformer whose self-attention is
  converted to linvid's variants (:mod:`dit.pretrained`), conditioned on caption embeddings.

``model.family`` in ``configs/model/*.yaml`` picks one (:func:`model_family`). A family builds
the model, turns a batch into the model's conditioning (with label or caption dropout for
classifier-free guidance), predicts the flow velocity, says which parameters train, makes
validation videos and loads a checkpoint for sampling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from dit.checkpoint import load_dit_for_sampling
from dit.model import build_dit
from dit.pretrained import (
    TRANSFORMER_CONFIG,
    convert_attention,
    converted_core_parameters,
    converted_processors,
    generate_text_videos,
    load_converted,
    load_pretrained_transformer,
    pretrained_config,
    self_attention_parameters,
    wan_velocity,
)
from dit.sampling import generate_videos

TRAINABLE = ("all", "attention")


class ClassConditionalDiT:
    """linvid's video DiT: class labels (``data.num_classes``; 0 = unconditional), label dropout ``model.class_dropout_prob``."""

    name = "dit"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def dropout_prob(self) -> float:
        return float(self.cfg.model.class_dropout_prob)

    def prepare_config(self, latent_shape: Sequence[int]) -> None:
        """Settings resolved from the data before training (none for this family)."""

    def checkpoint_files(self, model: nn.Module) -> dict:
        return {}

    def check(self, data_has_text: bool) -> None:
        if self.cfg.train.stage != "finetune":
            raise ValueError(f"train.stage={self.cfg.train.stage!r} needs a converted pretrained model (model=wan); "
                             f"linvid's own DiT trains with train.stage=finetune")

    def build(self, latent_shape: Sequence[int]) -> nn.Module:
        return build_dit(self.cfg.model, self.cfg.attention, in_channels=latent_shape[0], input_size=latent_shape[1:],
                         num_classes=self.cfg.data.num_classes)

    def summary(self, model: nn.Module, latent_shape: Sequence[int]) -> dict:
        return {"parameters": model.num_parameters(), "tokens_per_sample": model.num_tokens,
                "token_grid": list(model.grid), "forward_flops_per_sample": 2 * model.macs_per_sample()}

    def conditioning(self, batch: Mapping[str, Tensor], drop: Tensor, device) -> dict:
        if not self.cfg.data.num_classes:
            return {}
        return {"y": batch["label"].to(device), "drop_labels": drop.to(device)}

    @staticmethod
    def velocity(model: nn.Module, x: Tensor, t: Tensor, **conditioning) -> Tensor:
        return model(x, t, **conditioning)

    def attention_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for block in model.blocks for p in block.attn.parameters()]

    def compile(self, model: nn.Module) -> None:
        model.compile_blocks(backend=self.cfg.train.compile_backend)

    def validation_conditions(self, dataset, count: int) -> list[int] | None:
        num_classes = self.cfg.data.num_classes
        return [i % num_classes for i in range(count)] if num_classes else None

    def generate(self, model, decode, conditions, *, seeds, latent_shape, steps, cfg_scale, shift, batch_size,
                 device) -> np.ndarray:
        return generate_videos(model, decode, seeds=seeds, labels=conditions, steps=steps, cfg_scale=cfg_scale,
                               shift=shift, batch_size=batch_size, device=device)

    def load_for_sampling(self, checkpoint: Path, latent_shape: Sequence[int], weights: str) -> nn.Module:
        return load_dit_for_sampling(checkpoint, self.cfg, latent_shape, weights)


class PretrainedWan:
    """A pretrained Wan2.1 transformer with converted self-attention, on caption embeddings (``data.caption_dropout``)."""

    name = "wan"

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.empty_caption: Tensor | None = None  # (L, D); set from the training data before training

    def dropout_prob(self) -> float:
        return float(self.cfg.data.get("caption_dropout", 0.0))

    def prepare_config(self, latent_shape: Sequence[int]) -> None:
        """``model.reference_grid: null`` becomes the training clips' token grid, recorded in the run config."""
        if self.cfg.model.reference_grid is None:
            patch = pretrained_config(self.cfg.model.path)["patch_size"]
            self.cfg.model.reference_grid = list(self.grid(latent_shape, patch))

    def checkpoint_files(self, model: nn.Module) -> dict:
        """The architecture (diffusers config) beside the weights: :func:`dit.pretrained.load_converted` needs no pretrained folder."""
        config = json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}, indent=2)
        return {TRANSFORMER_CONFIG: lambda path: path.write_text(config)}

    def check(self, data_has_text: bool) -> None:
        if not data_has_text:
            raise ValueError("model=wan trains on captioned latents: extract them with text_encoder.path=<a local "
                             "UMT5 text encoder> (python -m data.extract_latents ...) and train with data=latents")
        if self.cfg.data.num_classes:
            raise ValueError("model=wan is conditioned on captions, not classes: set data.num_classes=0")
        if self.cfg.train.fvd_every:
            raise ValueError("train.fvd_every needs class-conditional samples; for model=wan compute FVD from "
                             "prompt videos instead (python -m eval.fvd real=<videos> fake=<videos>)")

    def grid(self, latent_shape: Sequence[int], patch: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(s) // int(p) for s, p in zip(latent_shape[1:], patch))

    def build(self, latent_shape: Sequence[int]) -> nn.Module:
        transformer = load_pretrained_transformer(self.cfg.model.path)
        if transformer.config.in_channels != latent_shape[0]:
            raise ValueError(f"model.path={self.cfg.model.path} takes {transformer.config.in_channels}-channel "
                             f"latents, but the training latents have {latent_shape[0]} channels: extract them with "
                             f"the VAE of the same model (vae=wan vae.path=<its vae/ folder>)")
        convert_attention(transformer, self.cfg.attention, grid=tuple(self.cfg.model.reference_grid))
        # Attention transfer keeps no activations but the converted cores' (the frozen blocks run without a
        # graph), so it needs no recomputation; block recomputation would also replay the transfer branch.
        if self.cfg.model.gradient_checkpointing and self.cfg.train.stage != "transfer":
            transformer.enable_gradient_checkpointing()
        return transformer

    def summary(self, model: nn.Module, latent_shape: Sequence[int]) -> dict:
        grid = self.grid(latent_shape, model.config.patch_size)
        return {"parameters": sum(p.numel() for p in model.parameters()), "tokens_per_sample": math.prod(grid),
                "token_grid": list(grid), "converted_blocks": sorted(converted_processors(model))}

    def conditioning(self, batch: Mapping[str, Tensor], drop: Tensor, device) -> dict:
        text = batch["text"].to(device)
        if bool(drop.any()):
            text = torch.where(drop.to(device)[:, None, None], self.empty_caption.to(device), text)
        return {"text": text}

    @staticmethod
    def velocity(model: nn.Module, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
        return wan_velocity(model, x, t, text)

    def attention_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self_attention_parameters(model)

    def compile(self, model: nn.Module) -> None:
        for block in model.blocks:
            block.compile(backend=self.cfg.train.compile_backend)

    def validation_conditions(self, dataset, count: int) -> Tensor:
        return torch.stack([dataset[i % len(dataset)]["text"] for i in range(count)]) if count else None

    def generate(self, model, decode, conditions, *, seeds, latent_shape, steps, cfg_scale, shift, batch_size,
                 device) -> np.ndarray:
        return generate_text_videos(model, decode, seeds=seeds, text=conditions, negative=self.empty_caption,
                                    latent_shape=latent_shape, steps=steps, cfg_scale=cfg_scale, shift=shift,
                                    batch_size=batch_size, device=device)

    def load_for_sampling(self, checkpoint: Path, latent_shape: Sequence[int], weights: str) -> nn.Module:
        return load_converted(checkpoint, weights)

    @staticmethod
    def transfer_loss(model: nn.Module, x: Tensor, t: Tensor, text: Tensor) -> tuple[Tensor, dict[int, float]]:
        """Attention transfer: mean over converted blocks of MSE(converted, frozen softmax) on the same inputs.

        Returns (loss, {block index: its loss}).
        """
        processors = converted_processors(getattr(model, "module", model))
        for processor in processors.values():
            processor.transfer = True
        try:
            wan_velocity(model, x, t, text)
            losses = {i: processor.transfer_loss for i, processor in processors.items()}
        finally:
            for processor in processors.values():
                processor.transfer, processor.transfer_loss = False, None
        return torch.stack(list(losses.values())).mean(), {i: float(loss.detach()) for i, loss in losses.items()}

    @staticmethod
    def transfer_parameters(model: nn.Module) -> list[nn.Parameter]:
        return converted_core_parameters(model)


FAMILIES = {"dit": ClassConditionalDiT, "wan": PretrainedWan}


def take(conditions: Tensor | Sequence | None, indices: Sequence[int]):
    """The conditions (labels, or caption embeddings (N, L, D)) of the samples ``indices``; None stays None."""
    if conditions is None:
        return None
    if isinstance(conditions, Tensor):
        return conditions[list(indices)]
    return [conditions[i] for i in indices]


def model_family(cfg: DictConfig) -> ClassConditionalDiT | PretrainedWan:
    """The family of a run config's ``model.family``."""
    family = cfg.model.get("family")
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not valid; choose one of {list(FAMILIES)}")
    return FAMILIES[family](cfg)


def trainable_parameters(family, model: nn.Module, train_cfg: DictConfig) -> list[nn.Parameter]:
    """The parameters a run trains; every other parameter is frozen (requires_grad False).

    ``train.stage=transfer``: only the variants' own parameters of the converted blocks (the
    teacher uses the pretrained projections, so they stay fixed). ``train.trainable``:
    ``all``, or ``attention`` = only the self-attention modules (converted parameters included).
    """
    if train_cfg.stage == "transfer":
        chosen = family.transfer_parameters(model)
    elif train_cfg.trainable == "attention":
        chosen = family.attention_parameters(model)
    else:
        chosen = list(model.parameters())
    keep = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if id(p) in keep]
