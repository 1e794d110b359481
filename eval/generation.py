"""Loading a checkpoint for sampling, and the per-sample seed and label conventions.

One home for what ``sample.py``, ``train.py``'s validation videos and ``eval.fvd`` share:

* ``load_sampling_setup(checkpoint, device, weights)`` -> (DiT, VAE, run config), exactly as a
  checkpoint was trained (its ``config.yaml``, EMA or raw weights, the run's VAE);
* ``generation_seed(seed, index)``: the seed of sample ``index``'s starting noise, so a video
  depends only on (seed, index, label, weights, settings), never on batching or ranks;
* ``cycle_labels(given, num_samples, num_classes)``: one class label per sample.

Import direction: top-level scripts (``train.py``, ``sample.py``) -> ``eval`` -> ``dit``, ``data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data.training_data import TrainingData
from data.vae import VideoVAE
from dit.checkpoint import resolve_checkpoint
from dit.families import model_family

SEED_STRIDE = 100_003  # seed of sample i = seed * SEED_STRIDE + i (sample.py's and train.py's convention)


def load_run_config(checkpoint: str | Path) -> DictConfig:
    """The resolved run config saved with a checkpoint (a run directory means its latest checkpoint)."""
    return OmegaConf.load(resolve_checkpoint(checkpoint) / "config.yaml")


def load_sampling_setup(checkpoint: str | Path, device: str | torch.device,
                        weights: str = "ema") -> tuple[torch.nn.Module, VideoVAE, DictConfig]:
    """(model on ``device`` in eval mode, the run's VAE on ``device``, run config) of a checkpoint directory.

    The model is the run's family's (:mod:`dit.families`): the class-conditional DiT, or a
    converted pretrained transformer. ``weights``: ``"ema"`` (what samples and FVD use) or
    ``"model"`` (the raw weights).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    run_cfg = load_run_config(checkpoint)
    data = TrainingData.of_run(run_cfg)
    vae = data.build_vae(device)
    latent_shape = data.latent_shape(vae)
    model = model_family(run_cfg).load_for_sampling(checkpoint, latent_shape, weights)
    return model.to(device), vae, run_cfg


def generation_seed(seed: int, index: int) -> int:
    """Seed of the starting noise of sample ``index`` of a generation run seeded ``seed``."""
    return int(seed) * SEED_STRIDE + int(index)


def cycle_labels(given: Sequence[int] | None, num_samples: int, num_classes: int) -> list[int] | None:
    """One class label per sample: ``given`` cycled, or all classes in turn when ``given`` is None.

    None for an unconditional model (``num_classes == 0``). Raises ValueError for labels
    outside ``0 .. num_classes - 1`` or an empty list.
    """
    if num_classes == 0:
        return None
    given = list(given) if given is not None else list(range(num_classes))
    bad = [y for y in given if not 0 <= int(y) < num_classes]
    if bad or not given:
        raise ValueError(f"labels={given} is not valid; this model has classes 0..{num_classes - 1}")
    return [int(given[i % len(given)]) for i in range(num_samples)]
