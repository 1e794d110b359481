"""The self-attention layer of the video DiT: projections around a variant core.

    x (B, N, C) -> fused qkv projection -> q/k RMSNorm -> heads (B, h, N, d)
      -> core (:mod:`attention.cores`, RoPE as the variant needs it) -> (B, h, N, d)
      -> core.gate -> output projection -> (B, N, C)

The token grid (T, H, W), N = T·H·W, and the RoPE tables are given per call, so one
layer serves any clip size. ``qk_norm`` picks where the q/k RMSNorm acts:
"per_head" normalises each head's d features; "across_heads" normalises the whole
width C before the heads are split, as Wan2.1 does, so its pretrained norm weights of
shape (C,) load unchanged.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from .cores import AttentionCore, choice
from .mhla import Grid
from .rope import RotaryTables

QK_NORMS = ("per_head", "across_heads")


class AttentionLayer(nn.Module):
    """Fused qkv linear, q/k RMSNorm, a core, its gate and the output projection.

    Args:
        dim: model width C; must equal ``core.dim``.
        num_heads: number of heads h; must equal ``core.num_heads``.
        core: the variant's :class:`~attention.cores.AttentionCore`.
        qk_norm: "per_head" (RMSNorm over d) or "across_heads" (RMSNorm over C).
    """

    def __init__(self, dim: int, num_heads: int, core: AttentionCore, *, qk_norm: str = "per_head"):
        super().__init__()
        choice("model.qk_norm", qk_norm, QK_NORMS)
        if core.dim != dim or core.num_heads != num_heads:
            raise ValueError(
                f"attention: the core was built for dim={core.dim}, num_heads={core.num_heads}, "
                f"the layer for dim={dim}, num_heads={num_heads}"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qk_norm = qk_norm
        norm_size = self.head_dim if qk_norm == "per_head" else dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(norm_size, eps=1e-6)
        self.k_norm = nn.RMSNorm(norm_size, eps=1e-6)
        self.core = core
        self.proj = nn.Linear(dim, dim)

    @property
    def variant(self) -> str:
        return self.core.variant

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, N, C) -> q, k, v (B, h, N, d), q and k RMS-normalised."""
        batch, num_tokens, _ = x.shape
        qkv = self.qkv(x)
        if self.qk_norm == "per_head":
            q, k, v = qkv.view(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return self.q_norm(q), self.k_norm(k), v
        q, k, v = qkv.chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = [t.view(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]
        return q, k, v

    def forward(self, x: Tensor, grid: Grid, rope: RotaryTables | None = None) -> Tensor:
        """x (B, N, C) on the token grid (T, H, W) (python ints, N = T·H·W) -> (B, N, C)."""
        batch, num_tokens, dim = x.shape
        if len(grid) != 3 or num_tokens != math.prod(grid) or dim != self.dim:
            raise ValueError(
                f"AttentionLayer: input {tuple(x.shape)} does not match the token grid {tuple(grid)} "
                f"({math.prod(grid)} tokens) and width {self.dim}"
            )
        q, k, v = self.heads(x)
        out = self.core(q, k, v, grid, rope)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj(self.core.gate(x, out))

    def macs(self, grid: Grid) -> int:
        """Multiply-accumulates per sample on a grid: qkv + output projections + the core's."""
        return 4 * math.prod(grid) * self.dim**2 + self.core.macs(grid)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, qk_norm={self.qk_norm}"
