"""3D rotary position embedding (RoPE) for a (T, H, W) token grid.

The head dimension d is split into three even parts rotated by the frame, row and
column index respectively: d_h = d_w = 2·⌊d/6⌋ and d_t = d − d_h − d_w (time gets the
remainder). Tokens are ordered t-major: n = (t·H + h)·W + w, matching the DiT's
patch embedding. The DiT owns one instance and passes it to every attention layer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(d_t, d_h, d_w) for a head dimension; all even, summing to head_dim."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dimension of at least 6, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


class Rope3D(nn.Module):
    """Rotation tables for one token grid.

    Args:
        head_dim: per-head feature size d (even, ≥ 6).
        grid: token grid (T, H, W); N = T·H·W.
        theta: frequency base.
    Buffers ``cos``/``sin`` have shape (N, d/2), float32.
    """

    def __init__(self, head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.grid = tuple(int(g) for g in grid)
        angles = []
        for axis, (size, dim) in enumerate(zip(self.grid, rope_axis_dims(head_dim))):
            freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
            axis_angles = torch.arange(size, dtype=torch.float64)[:, None] * freqs  # (size, dim/2)
            shape = [1, 1, 1, dim // 2]
            shape[axis] = size
            angles.append(axis_angles.view(shape).expand(*self.grid, dim // 2))
        angle = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # (N, d/2)
        self.register_buffer("cos", angle.cos().float(), persistent=False)
        self.register_buffer("sin", angle.sin().float(), persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.cos.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        """Rotate consecutive feature pairs of x (B, H, N, d); same shape and dtype out."""
        if x.shape[-2:] != (self.num_tokens, self.head_dim):
            raise ValueError(
                f"Rope3D for grid {self.grid} and head_dim {self.head_dim} got input {tuple(x.shape)}"
            )
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        pairs = x.to(compute).unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        cos, sin = self.cos.to(compute), self.sin.to(compute)
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
        return rotated.flatten(-2).to(x.dtype)
