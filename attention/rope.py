"""3D rotary position embedding (RoPE) for a (T, H, W) token grid, computed per call.

The head dimension d is split into three even parts rotated by the frame, row and
column index respectively: d_h = d_w = 2·⌊d/6⌋ and d_t = d − d_h − d_w (time gets the
remainder). Feature pairs (2i, 2i+1) are rotated together ("interleaved" pairs). Tokens
are ordered t-major: n = (t·H + h)·W + w, matching the DiT's patch embedding. This is
exactly the split, frequency formula and rotation of diffusers' Wan2.1 transformer
(``WanRotaryPosEmbed`` and its attention processor); :func:`rotary_tables_from_wan`
turns the tables a Wan model hands its processors into :class:`RotaryTables`.

Tables are plain tensors, never module buffers, so ``model.to(torch.bfloat16)`` cannot
round them: they are computed in float64, stored in float32, and :func:`apply_rope`
rotates in float32 (float64 for float64 inputs) whatever the model dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class RotaryTables(NamedTuple):
    """cos / sin of the rotation angle of every (token, feature pair): each (N, d/2), float32."""

    cos: Tensor
    sin: Tensor


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(d_t, d_h, d_w) for a head dimension; all even, summing to head_dim."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head dimension of at least 6, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


def rope_tables(
    head_dim: int,
    grid: tuple[int, int, int],
    *,
    theta: float = 10000.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> RotaryTables:
    """Rotation tables for a token grid (T, H, W) and head size d.

    Axis a with d_a features rotates pair i by angle pos_a · θ^(−2i/d_a), the same float64
    formula as Wan2.1. Returns :class:`RotaryTables` with cos, sin of shape (T·H·W, d/2),
    computed in float64 and stored in ``dtype`` (float32; float64 for exact oracles).
    """
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"rope_tables: grid must be three positive sizes (T, H, W), got {grid}")
    angles = []
    for axis, (size, dim) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
        axis_angles = torch.arange(size, dtype=torch.float64)[:, None] * freqs  # (size, dim/2)
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        angles.append(axis_angles.view(shape).expand(*grid, dim // 2))
    angle = torch.cat(angles, dim=-1).reshape(-1, head_dim // 2)  # (N, d/2)
    return RotaryTables(angle.cos().to(device=device, dtype=dtype), angle.sin().to(device=device, dtype=dtype))


def apply_rope(x: Tensor, tables: RotaryTables) -> Tensor:
    """Rotate the feature pairs (2i, 2i+1) of x (..., N, d) by the tables' angles.

    The rotation runs in float32 (float64 for float64 input) and the result is cast back
    to x's dtype. tables: cos, sin of shape (N, d/2).
    """
    cos, sin = tables
    if x.shape[-2] != cos.shape[0] or x.shape[-1] != 2 * cos.shape[1]:
        raise ValueError(
            f"apply_rope: tables for {cos.shape[0]} tokens and head size {2 * cos.shape[1]} cannot rotate "
            f"an input of shape {tuple(x.shape)}"
        )
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = cos.to(compute), sin.to(compute)
    even, odd = x.to(compute).unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def rotary_tables_from_wan(rotary_emb: tuple[Tensor, Tensor]) -> RotaryTables:
    """:class:`RotaryTables` from the ``rotary_emb=(freqs_cos, freqs_sin)`` of diffusers' Wan model.

    Wan's tables are (1, N, 1, d) with every angle repeated for both members of a pair
    (``repeat_interleave``); its processor reads ``freqs_cos[..., 0::2]`` and
    ``freqs_sin[..., 1::2]``. Returns float32 tables of shape (N, d/2).
    """
    freqs_cos, freqs_sin = rotary_emb
    if freqs_cos.shape != freqs_sin.shape or freqs_cos.dim() != 4 or freqs_cos.shape[0] != 1 or freqs_cos.shape[2] != 1:
        raise ValueError(
            f"rotary_tables_from_wan expects Wan's (1, N, 1, d) cos and sin tables, got "
            f"{tuple(freqs_cos.shape)} and {tuple(freqs_sin.shape)}"
        )
    cos = freqs_cos[0, :, 0, 0::2].to(torch.float32)
    sin = freqs_sin[0, :, 0, 1::2].to(torch.float32)
    return RotaryTables(cos.contiguous(), sin.contiguous())
