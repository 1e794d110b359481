"""Tiny randomly initialised diffusers VAEs saved to local folders, for fast CPU tests.

Each ``save_tiny_*_vae(path)`` builds a VAE with the same compression as the real model
(8x in space; 4x in time for the video VAEs) but only a few thousand parameters, saves it
with ``save_pretrained(path)`` and returns ``path``. Weights are seeded (``seed``), so the
same call always writes the same VAE; keyword overrides change the config, e.g.
``save_tiny_image_vae(p, block_out_channels=(8, 8))`` for a 2x spatial VAE.
Encoding + decoding a (1, 3, 9, 16, 16) clip takes well under a second with each.

Use as ``from tests.vae_fixtures import save_tiny_vae`` then
``build_vae(OmegaConf.create({"name": "wan", "path": str(save_tiny_vae("wan", tmp_path / "vae"))}))``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Non-trivial shift/scale so that tests can see the latent normalisation being applied.
TINY_IMAGE_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),  # 4 levels -> 8x spatial compression
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=2,
    sample_size=32,
    scaling_factor=0.5,
    shift_factor=0.1,
)

TINY_WAN_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=4,
    z_dim=4,
    dim_mult=[1, 1, 1, 1],  # 4 levels -> 8x spatial compression
    num_res_blocks=1,
    temperal_downsample=[False, True, True],  # 4x temporal compression, as in Wan 2.1
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.5, 2.0, 1.0],
    scale_factor_temporal=4,
    scale_factor_spatial=8,
)

TINY_COGVIDEOX_VAE_CONFIG: dict[str, Any] = dict(
    block_out_channels=(8, 8, 8, 8),  # 4 levels -> 8x spatial compression
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=2,
    temporal_compression_ratio=4,
    sample_height=32,
    sample_width=32,
    scaling_factor=0.7,
)


def _save(class_name: str, base_config: dict, path: str | Path, seed: int, overrides: dict) -> Path:
    import diffusers

    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream alone
        torch.manual_seed(seed)
        model = getattr(diffusers, class_name)(**{**base_config, **overrides})
    model.save_pretrained(path)
    return path


def save_tiny_image_vae(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Tiny 2D ``AutoencoderKL`` (4 latent channels, 8x spatial) saved to ``path``."""
    return _save("AutoencoderKL", TINY_IMAGE_VAE_CONFIG, path, seed, overrides)


def save_tiny_wan_vae(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Tiny ``AutoencoderKLWan`` (4 latent channels, 4x temporal, 8x spatial) saved to ``path``."""
    return _save("AutoencoderKLWan", TINY_WAN_VAE_CONFIG, path, seed, overrides)


def save_tiny_cogvideox_vae(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Tiny ``AutoencoderKLCogVideoX`` (4 latent channels, 4x temporal, 8x spatial) saved to ``path``."""
    return _save("AutoencoderKLCogVideoX", TINY_COGVIDEOX_VAE_CONFIG, path, seed, overrides)


# vae.name -> function(path, **overrides) that writes a tiny VAE of that kind.
TINY_VAE_SAVERS = {
    "image": save_tiny_image_vae,
    "wan": save_tiny_wan_vae,
    "cogvideox": save_tiny_cogvideox_vae,
}


def save_tiny_vae(name: str, path: str | Path, **overrides: Any) -> Path:
    """Write the tiny VAE for ``vae.name`` ``name`` ("image", "wan" or "cogvideox") to ``path``."""
    return TINY_VAE_SAVERS[name](path, **overrides)
