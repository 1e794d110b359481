"""Generating videos from a trained DiT: seeded noise, guided Euler sampling, decoding.

Each sample's starting noise comes from its own seed, so a video depends only on
(seed, label, weights, settings) — not on the batch it was generated in or on which
process generated it. That makes sampling reproducible and easy to split across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .flow import euler_sample
from .model import VideoDiT


def sample_noise(seed: int, shape: Sequence[int]) -> Tensor:
    """(C, T, H, W) float32 standard normal noise from a CPU generator seeded by ``seed``."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(seed)))


def videos_to_uint8(video: Tensor) -> np.ndarray:
    """(B, 3, T, H, W) float in [-1, 1] -> (B, T, H, W, 3) uint8."""
    scaled = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 4, 1).cpu().numpy()


@torch.no_grad()
def generate_videos(
    model: VideoDiT,
    decode: Callable[[Tensor], Tensor],
    *,
    seeds: Sequence[int],
    labels: Sequence[int] | None,
    steps: int,
    cfg_scale: float,
    shift: float,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """Sample one video per seed and return them as (N, T, H, W, 3) uint8.

    decode: latents (B, C, T', H', W') -> video (B, 3, T, H, W) in [-1, 1] (the VAE).
    labels: one class per seed, or None for an unconditional model.
    """
    was_training = model.training
    model.eval()
    latent_shape = (model.in_channels, *model.input_size)
    outputs = []
    for start in range(0, len(seeds), batch_size):
        chunk = list(seeds[start : start + batch_size])
        noise = torch.stack([sample_noise(s, latent_shape) for s in chunk]).to(device, dtype)
        y = None
        if labels is not None:
            y = torch.tensor(list(labels[start : start + batch_size]), dtype=torch.long, device=device)

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return model.forward_with_cfg(x, t, y, cfg_scale)

        latents = euler_sample(velocity, noise, steps=steps, shift=shift)
        outputs.append(videos_to_uint8(decode(latents)))
    model.train(was_training)
    return np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.uint8)
