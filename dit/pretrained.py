"""Pretrained text-to-video DiTs: a local diffusers Wan2.1 transformer with linvid's self-attention.

    transformer = load_pretrained_transformer("Wan2.1-T2V-1.3B-Diffusers/transformer")
    convert_attention(transformer, {"name": "mhla", ...})        # in place; returns the same model
    transformer = load_converted("runs/wan-mhla")                 # a run or checkpoint directory

Only the self-attention of each block (``blocks[i].attn1``) is converted; cross-attention to
the text stays softmax. A converted block keeps Wan's pretrained q/k/v/output projections
and its q/k RMSNorm (over all heads at once), rotates with Wan's own RoPE tables, and runs
linvid's core (:mod:`attention.cores`) in between; the only new parameters are the variant's
own (HLA factor maps, MHLA mixing and gate, the output RMSNorm of un-normalised variants).
Blocks whose variant is softmax keep diffusers' own processor, so ``{name: softmax}`` is the
stock model. The token grid comes from the input at every call (a forward pre-hook hands
it to the converted blocks), so one converted model serves every size Wan accepts.

diffusers' ``from_pretrained`` does not know converted processors (it would drop their
weights and install the stock processor again): a converted model is rebuilt from its
architecture config and the saved conversion, then its weights are loaded
(:func:`load_converted`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from attention import (
    AttentionCore,
    build_attention_core,
    layer_configs,
    rotary_tables_from_wan,
)
from dit.checkpoint import load_state_dict, resolve_checkpoint

WAN_CLASS_NAME = "WanTransformer3DModel"
# The latent token grid Wan2.1 was trained at (480x832, 81 frames: 21x30x52 after 1x2x2 patches):
# the reference for settings that need one (MHLA layout: auto) when no grid is given.
WAN_REFERENCE_GRID = (21, 30, 52)
TRANSFORMER_CONFIG = "transformer_config.json"  # the architecture, saved with every checkpoint


class PretrainedModelError(ValueError):
    """model.path does not hold a pretrained model linvid can convert."""


def pretrained_config(path: str | Path) -> dict:
    """The diffusers config of the ``WanTransformer3DModel`` at ``model.path`` (checked; no weights read)."""
    return _read_model_config(Path(path).expanduser())


def _read_model_config(path: Path) -> dict:
    if not path.is_dir():
        raise PretrainedModelError(
            f"model.path={path} is not a local folder. Pretrained models are loaded from local folders only "
            f"(no model hub): point model.path at a diffusers {WAN_CLASS_NAME} folder, e.g. "
            f"Wan2.1-T2V-1.3B-Diffusers/transformer"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = " (it looks like a pipeline folder: use its transformer/ subfolder)" if (path / "transformer").is_dir() else ""
        raise PretrainedModelError(f"model.path={path} has no config.json{hint}; it is not a diffusers model folder")
    config = json.loads(config_file.read_text())
    found = config.get("_class_name")
    if found != WAN_CLASS_NAME:
        raise PretrainedModelError(f"model.path={path} holds a {found or 'model of unknown class'}, but model=wan "
                                   f"needs a diffusers {WAN_CLASS_NAME}")
    return config


def load_pretrained_transformer(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The pretrained ``WanTransformer3DModel`` of a local diffusers folder (checked first, see the errors)."""
    from diffusers import WanTransformer3DModel

    path = Path(path).expanduser()
    _read_model_config(path)
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise PretrainedModelError(f"model.path={path} has a config.json but no weights (*.safetensors)")
    return WanTransformer3DModel.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype)


class ConvertedSelfAttention(nn.Module):
    """The processor of a converted Wan self-attention: Wan's projections and norms, linvid's core.

    Called by diffusers as ``processor(attn, hidden_states, encoder_hidden_states,
    attention_mask, rotary_emb)`` with hidden_states (B, N, C) and Wan's rotary tables;
    returns (B, N, C). ``grid`` is set before every forward by the model's pre-hook.

    In attention-transfer mode (``transfer = True``) it also computes the stock softmax
    attention of the same block on the same input without gradients (the teacher), keeps
    ``transfer_loss`` = MSE(converted, teacher), and returns the teacher's output, so the rest
    of the model runs exactly as the pretrained one and every block learns on its own inputs.
    """

    def __init__(self, core: AttentionCore):
        super().__init__()
        self.core = core
        self.grid: tuple[int, int, int] | None = None
        self.transfer = False
        self.transfer_loss: Tensor | None = None

    def forward(self, attn: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, rotary_emb: tuple[Tensor, Tensor] | None = None) -> Tensor:
        if self.grid is None:
            raise RuntimeError("a converted Wan self-attention was called without a token grid; call the whole "
                               "converted transformer (its forward pre-hook sets the grid)")

        def heads(x: Tensor) -> Tensor:  # (B, N, C) -> (B, h, N, d)
            return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)

        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(hidden_states))
        v = attn.to_v(hidden_states)
        rope = None if rotary_emb is None else rotary_tables_from_wan(rotary_emb)
        out = self.core(heads(q), heads(k), heads(v), self.grid, rope)
        out = self.core.gate(hidden_states, out.transpose(1, 2).flatten(2).type_as(hidden_states))
        out = attn.to_out[1](attn.to_out[0](out))
        if not self.transfer:
            return out
        with torch.no_grad():
            teacher = _stock_processor()(attn, hidden_states, None, None, rotary_emb)
        self.transfer_loss = F.mse_loss(out.float(), teacher.float())
        return teacher


def _stock_processor():
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    return WanAttnProcessor()


def record_grid(transformer: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: the token grid of this call, for every converted block."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    patch = transformer.config.patch_size
    grid = tuple(int(size) // int(p) for size, p in zip(hidden_states.shape[2:], patch))
    for processor in converted_processors(transformer).values():
        processor.grid = grid


def converted_processors(transformer: nn.Module) -> dict[int, ConvertedSelfAttention]:
    """{block index: processor} of the converted self-attention blocks."""
    return {i: block.attn1.processor for i, block in enumerate(transformer.blocks)
            if isinstance(block.attn1.processor, ConvertedSelfAttention)}


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def convert_attention(transformer: nn.Module, attention_config: Mapping,
                      *, grid: tuple[int, int, int] | None = None) -> nn.Module:
    """Replace, in place, the self-attention of a ``WanTransformer3DModel``'s blocks with linvid's variants.

    ``attention_config`` is a node like ``configs/attention/*.yaml`` (one variant, or a hybrid
    pattern over the blocks). ``grid`` is the reference token grid of settings that need one
    (MHLA ``layout: auto``); default :data:`WAN_REFERENCE_GRID`. New parameters are created
    on the transformer's device and dtype. Returns the same (now converted) model, which
    records its conversion in ``transformer.linvid_attention``.
    """
    if type(transformer).__name__ != WAN_CLASS_NAME:
        raise PretrainedModelError(f"convert_attention converts a diffusers {WAN_CLASS_NAME}, got "
                                   f"{type(transformer).__name__}")
    if converted_processors(transformer):
        raise PretrainedModelError("this transformer is converted already; load a fresh pretrained one")
    config = _plain(attention_config)
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    heads = transformer.config.num_attention_heads
    parameter = next(transformer.parameters())
    for block, node in zip(transformer.blocks, layer_configs(config, len(transformer.blocks))):
        if node.get("name") == "softmax":
            continue  # the stock processor is softmax attention with Wan's RoPE
        core = build_attention_core(node, dim=dim, num_heads=heads, grid=grid or WAN_REFERENCE_GRID)
        block.attn1.set_processor(ConvertedSelfAttention(core.to(parameter.device, parameter.dtype)))
    transformer.register_forward_pre_hook(record_grid, with_kwargs=True)
    transformer.linvid_attention = config
    return transformer


def self_attention_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """Every parameter of the blocks' self-attention modules (projections, norms, converted cores)."""
    return [p for block in transformer.blocks for p in block.attn1.parameters()]


def converted_core_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    """The parameters the conversion added (the variants' own): what attention transfer trains."""
    return [p for processor in converted_processors(transformer).values() for p in processor.parameters()]


def build_converted(architecture: Mapping, attention_config: Mapping,
                    grid: tuple[int, int, int] | None = None) -> nn.Module:
    """A randomly initialised converted transformer of an architecture config (weights come next)."""
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in dict(architecture).items() if not k.startswith("_")}
    return convert_attention(WanTransformer3DModel.from_config(config), attention_config, grid=grid)


def load_converted(checkpoint: str | Path, weights: str = "ema") -> nn.Module:
    """The converted ``WanTransformer3DModel`` of a linvid checkpoint (a run directory: its latest), in eval mode.

    The checkpoint's ``transformer_config.json`` gives the architecture and its ``config.yaml``
    the conversion, so the pretrained folder is not needed; ``weights`` picks the EMA
    (``"ema"``) or the raw (``"model"``) weights. Ready for ``sample.py`` or diffusers' ``WanPipeline``.
    """
    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r} is not valid; choose one of ['ema', 'model']")
    checkpoint = resolve_checkpoint(checkpoint)
    if not (checkpoint / TRANSFORMER_CONFIG).is_file():
        raise PretrainedModelError(f"{checkpoint} has no {TRANSFORMER_CONFIG}: it is not a checkpoint of a "
                                   f"converted pretrained model (model=wan)")
    run_cfg = OmegaConf.load(checkpoint / "config.yaml")
    architecture = json.loads((checkpoint / TRANSFORMER_CONFIG).read_text())
    transformer = build_converted(architecture, run_cfg.attention, grid=tuple(run_cfg.model.reference_grid))
    transformer.load_state_dict(load_state_dict(checkpoint / f"{weights}.safetensors"))
    return transformer.eval()


def wan_velocity(transformer: nn.Module, x: Tensor, t: Tensor, text: Tensor) -> Tensor:
    """Wan's prediction in linvid's flow convention: x (B, C, T, H, W) at flow time t (B,) in [0, 1].

    Wan is trained as diffusers' flow matching: x_t = (1 − σ)·x₀ + σ·ε, target ε − x₀, timestep
    1000·σ, text = caption embeddings (B, L, D). That is linvid's rectified flow with σ = t.
    """
    return transformer(x, 1000.0 * t, encoder_hidden_states=text, return_dict=False)[0]


@torch.no_grad()
def generate_text_videos(transformer: nn.Module, decode, *, seeds, text: Tensor, negative: Tensor, latent_shape,
                         steps: int, cfg_scale: float, shift: float, batch_size: int, device, dtype=torch.float32):
    """Videos of a (converted) Wan transformer: sample i from seed i, conditioned on caption embeddings ``text[i]``.

    text: (N, L, D); negative: (L, D), the negative prompt's (or empty caption's) embeddings for
    classifier-free guidance v = v(negative) + cfg_scale·(v(text) − v(negative)); scale 1 = off.
    Returns (N, T, H, W, 3) uint8.
    """
    from dit.sampling import sample_videos

    was_training = transformer.training
    transformer.eval()

    def velocity_for(batch: slice):
        cond = text[batch].to(device)
        if cfg_scale == 1.0:
            return lambda x, t: wan_velocity(transformer, x, t, cond)
        both = torch.cat([cond, negative.to(device).expand_as(cond)])

        def guided(x: Tensor, t: Tensor) -> Tensor:
            v_cond, v_neg = wan_velocity(transformer, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return v_neg + cfg_scale * (v_cond - v_neg)

        return guided

    videos = sample_videos(velocity_for, decode, seeds=seeds, latent_shape=latent_shape, steps=steps, shift=shift,
                           batch_size=batch_size, device=device, dtype=dtype)
    transformer.train(was_training)
    return videos
