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
def sample_videos(
    velocity_for: Callable[[slice], Callable[[Tensor, Tensor], Tensor]],
    decode: Callable[[Tensor], Tensor],
    *,
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    steps: int,
    shift: float,
    batch_size: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """One video per seed, ``batch_size`` at a time; returns (N, T, H, W, 3) uint8.

    velocity_for: given the slice of samples of a batch, the velocity (x, t) -> v to integrate
    for it (with that batch's conditioning and guidance). latent_shape: (C, T', H', W').
    decode: latents (B, C, T', H', W') -> video (B, 3, T, H, W) in [-1, 1] (the VAE).
    """
    outputs = []
    for start in range(0, len(seeds), batch_size):
        batch = slice(start, min(start + batch_size, len(seeds)))
        noise = torch.stack([sample_noise(s, latent_shape) for s in seeds[batch]]).to(device, dtype)
        latents = euler_sample(velocity_for(batch), noise, steps=steps, shift=shift)
        outputs.append(videos_to_uint8(decode(latents)))
    return np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.uint8)


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
    """Videos of the class-conditional DiT: one per seed, class ``labels[i]`` (None: unconditional)."""
    was_training = model.training
    model.eval()

    def velocity_for(batch: slice) -> Callable[[Tensor, Tensor], Tensor]:
        y = None if labels is None else torch.tensor(list(labels[batch]), dtype=torch.long, device=device)
        return lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale)

    videos = sample_videos(velocity_for, decode, seeds=seeds, latent_shape=(model.in_channels, *model.input_size),
                           steps=steps, shift=shift, batch_size=batch_size, device=device, dtype=dtype)
    model.train(was_training)
    return videos
