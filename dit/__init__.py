"""The video DiT, its rectified-flow objective and sampler, and checkpoint I/O."""

from .model import VideoDiT, build_dit

__all__ = ["VideoDiT", "build_dit"]
