"""Self-attention layers for the video DiT, one class per variant.

All layers share the outer structure of :class:`AttentionLayer`:

    x (B, N, C) -> qkv projection -> heads (B, h, N, d) -> per-head RMSNorm on q, k
      -> variant core (with 3D RoPE as the variant needs it) -> (B, h, N, d)
      -> [optional gate] -> output projection -> (B, N, C)

A layer is built for one token grid (T, H, W), N = T·H·W, so that settings that
depend on the grid (MHLA's block layout) are checked at construction time. Each
layer reports the multiply-accumulates of its core per sample (``core_macs``) so
the DiT can print FLOPs for the chosen attention.

How RoPE combines with each variant:
- softmax, HLA: q and k are rotated before the core (for HLA, before the factor
  maps, so tied Taylor factors approximate softmax *with* RoPE);
- linear, MHLA: the features φ(q), φ(k) are rotated after the feature map and used
  in the numerator only; the normaliser (if any) keeps the un-rotated features.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import hla_attention, linear_attention, mhla_attention, softmax_attention
from .rope import Rope3D, rope_axis_dims

Grid = tuple[int, int, int]


class Constrained:
    """A module whose parameters must stay in a set: the trainer projects them after every optimizer step.

    ``constraints()`` lists (parameter, element-wise projection) pairs; ``constrain_()`` applies
    them in place. Element-wise, so sharded copies (DeepSpeed ZeRO-3) can be projected piece by piece.
    """

    def constraints(self) -> list[tuple[nn.Parameter, Callable[[Tensor], Tensor]]]:
        raise NotImplementedError

    @torch.no_grad()
    def constrain_(self) -> None:
        for param, project in self.constraints():
            param.copy_(project(param))


def constrain_(model: nn.Module) -> None:
    """Apply the constraints of every :class:`Constrained` module of ``model`` (after an optimizer step)."""
    for module in model.modules():
        if isinstance(module, Constrained):
            module.constrain_()


def _choice(setting: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{setting}={value!r} is not valid; choose one of {list(choices)}")


class AttentionLayer(nn.Module):
    """Shared outer layer. Subclasses implement :meth:`core` and :meth:`core_macs`.

    Args:
        dim: model width C (divisible by ``num_heads``).
        num_heads: number of heads h; head size d = C / h must be even and ≥ 6 (RoPE).
        grid: token grid (T, H, W).
    """

    variant = "base"

    def __init__(self, dim: int, num_heads: int, grid: Grid):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"attention: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        rope_axis_dims(self.head_dim)  # raises for head sizes RoPE cannot split
        if len(grid) != 3 or min(grid) < 1:
            raise ValueError(f"attention: grid must be three positive sizes (T, H, W), got {grid}")
        self.grid: Grid = tuple(int(g) for g in grid)
        self.num_tokens = math.prod(self.grid)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: Rope3D | None = None) -> Tensor:
        """x (B, N, C) -> (B, N, C). ``rope`` rotates q/k as the variant requires."""
        batch, num_tokens, dim = x.shape
        if num_tokens != self.num_tokens or dim != self.dim:
            raise ValueError(
                f"{type(self).__name__} built for {self.num_tokens} tokens (grid {self.grid}) and "
                f"width {self.dim}, got input {tuple(x.shape)}"
            )
        q, k, v = self.qkv(x).view(batch, num_tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.core(self.q_norm(q), self.k_norm(k), v, rope)  # (B, h, N, d)
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        return self.proj(self.gate(x, out))

    def gate(self, x: Tensor, out: Tensor) -> Tensor:
        """Hook for an output gate; identity by default. x, out: (B, N, C)."""
        return out

    def core(self, q: Tensor, k: Tensor, v: Tensor, rope: Rope3D | None) -> Tensor:
        raise NotImplementedError

    def core_macs(self) -> int:
        """Multiply-accumulates of the attention core per sample, all heads."""
        raise NotImplementedError

    def extra_macs(self) -> int:
        """Multiply-accumulates per sample of variant-specific maps (factor maps, gates)."""
        return 0

    def macs(self) -> int:
        """Multiply-accumulates of the whole layer per sample: qkv + output projections + core."""
        return 4 * self.num_tokens * self.dim**2 + self.core_macs() + self.extra_macs()

    def extra_repr(self) -> str:
        return f"variant={self.variant}, dim={self.dim}, heads={self.num_heads}, grid={self.grid}"


class SoftmaxAttention(AttentionLayer):
    """softmax(q kᵀ/√d) v with RoPE on q, k; SDPA kernels."""

    variant = "softmax"

    def core(self, q, k, v, rope):
        if rope is not None:
            q, k = rope(q), rope(k)
        return softmax_attention(q, k, v)

    def core_macs(self) -> int:
        return 2 * self.num_heads * self.num_tokens**2 * self.head_dim


class _FeatureMapAttention(AttentionLayer):
    """Linear-style core: positive features, RoPE in the numerator, optional output RMSNorm."""

    FEATURE_MAPS = ("relu", "elu")

    def __init__(self, dim, num_heads, grid, *, feature_map: str, normalize: bool, eps: float):
        super().__init__(dim, num_heads, grid)
        _choice(f"attention.{self.variant}.feature_map", feature_map, self.FEATURE_MAPS)
        self.feature_map, self.normalize, self.eps = feature_map, bool(normalize), float(eps)
        self.out_norm = None if self.normalize else nn.RMSNorm(self.head_dim, eps=1e-6)

    def features(self, x: Tensor) -> Tensor:
        """Positive feature map φ applied after the qk RMSNorm."""
        if self.feature_map == "relu":
            return F.relu(x) + 1e-6
        return F.elu(x) + 1.0

    def linear_core(self, q: Tensor, k: Tensor, v: Tensor, **kwargs) -> Tensor:
        raise NotImplementedError

    def core(self, q, k, v, rope):
        q, k = self.features(q), self.features(k)
        if rope is None:
            out = self.linear_core(q, k, v, normalize=self.normalize, eps=self.eps)
        else:
            out = self.linear_core(rope(q), rope(k), v, normalize=False)
            if self.normalize:
                ones = torch.ones_like(v[..., :1])
                out = out / (self.linear_core(q, k, ones, normalize=False) + self.eps)
        return out if self.out_norm is None else self.out_norm(out)


class LinearAttention(_FeatureMapAttention):
    """Plain kernelised linear attention (the baseline): A = φ(q) φ(k)ᵀ."""

    variant = "linear"

    def __init__(self, dim, num_heads, grid, *, feature_map="relu", normalize=True, eps=1e-6):
        super().__init__(dim, num_heads, grid, feature_map=feature_map, normalize=normalize, eps=eps)

    def linear_core(self, q, k, v, **kwargs):
        return linear_attention(q, k, v, **kwargs)

    def core_macs(self) -> int:
        width = self.head_dim + int(self.normalize)
        return 2 * self.num_heads * self.num_tokens * self.head_dim * width


def mhla_valid_layouts(grid: Grid) -> list[Grid]:
    """All block layouts (Mt, Mh, Mw) whose counts divide the grid (T, H, W)."""
    divisors = [[m for m in range(1, g + 1) if g % m == 0] for g in grid]
    return [tuple(layout) for layout in itertools.product(*divisors)]


def mhla_auto_layout(grid: Grid) -> Grid:
    """The dividing layout with the most blocks M such that M² ≤ N.

    Ties go to the layout whose blocks are closest to cubes (smallest ratio of longest
    to shortest block side), then to the one with more spatial blocks (Mh·Mw), then Mh.
    """
    num_tokens = math.prod(grid)
    candidates = [lay for lay in mhla_valid_layouts(grid) if math.prod(lay) ** 2 <= num_tokens]

    def preference(layout: Grid):
        sides = [g // m for g, m in zip(grid, layout)]
        return (math.prod(layout), -max(sides) / min(sides), layout[1] * layout[2], layout[1])

    return max(candidates, key=preference)


def mhla_block_index(grid: Grid, layout: Grid) -> Tensor:
    """(N,) long: block of each token, b = (bt·Mh + bh)·Mw + bw over 3D windows."""
    sizes = [g // m for g, m in zip(grid, layout)]
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    index = ((t // sizes[0]) * layout[1] + h // sizes[1]) * layout[2] + w // sizes[2]
    return index.reshape(-1)


def mhla_locality_mixing(layout: Grid) -> Tensor:
    """(M, M) locality-biased init: m_ij ∝ 1 − ‖c_i − c_j‖ / max_k ‖c_i − c_k‖, rows sum to 1.

    Block centres c_i are the block coordinates on the block grid.
    """
    centres = torch.stack(
        torch.meshgrid(*(torch.arange(m, dtype=torch.float64) for m in layout), indexing="ij"), dim=-1
    ).reshape(-1, 3)
    distance = torch.cdist(centres, centres)
    farthest = distance.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    weights = 1.0 - distance / farthest
    return (weights / weights.sum(dim=1, keepdim=True)).float()


class MHLAAttention(Constrained, _FeatureMapAttention):
    """Multi-head linear attention: heads along the token axis with a learned block mixing.

    Settings:
        layout: "auto" or (Mt, Mh, Mw) block counts along T, H, W (must divide the grid).
        mixing_init: "locality" (paper) or "uniform".
        normalize: divide by the mixed normaliser (Eq. 4), or not + per-head output RMSNorm.
        gate: multiply the output by SiLU(W_g x) before the output projection.
    """

    variant = "mhla"
    MIXING_INITS = ("locality", "uniform")

    def __init__(
        self,
        dim,
        num_heads,
        grid,
        *,
        layout="auto",
        mixing_init="locality",
        normalize=False,
        gate=False,
        feature_map="relu",
        eps=1e-6,
    ):
        super().__init__(dim, num_heads, grid, feature_map=feature_map, normalize=normalize, eps=eps)
        self.layout = self._resolve_layout(layout)
        _choice("attention.mhla.mixing_init", mixing_init, self.MIXING_INITS)
        num_blocks = math.prod(self.layout)
        self.register_buffer("block_index", mhla_block_index(self.grid, self.layout), persistent=False)
        if mixing_init == "locality":
            mixing = mhla_locality_mixing(self.layout)
        else:
            mixing = torch.full((num_blocks, num_blocks), 1.0 / num_blocks)
        self.mixing = nn.Parameter(mixing)
        self.gate_proj = nn.Linear(dim, dim) if gate else None

    def _resolve_layout(self, layout) -> Grid:
        valid = mhla_valid_layouts(self.grid)
        if layout == "auto":
            return mhla_auto_layout(self.grid)
        if isinstance(layout, str) or len(layout) != 3:
            raise ValueError(
                f"attention.mhla.layout={layout!r} is not valid; use 'auto' or three block counts "
                f"[Mt, Mh, Mw] that divide the token grid {self.grid}, e.g. {valid[-1]}"
            )
        layout = tuple(int(m) for m in layout)
        if layout not in valid:
            shown = ", ".join(str(list(v)) for v in valid[:12]) + (" …" if len(valid) > 12 else "")
            raise ValueError(
                f"attention.mhla.layout={list(layout)} does not divide the token grid {list(self.grid)}; "
                f"valid layouts: auto, {shown}"
            )
        return layout

    def constraints(self):
        """The mixing matrix stays in [0, 1] (the trainer projects it after every optimizer step)."""
        return [(self.mixing, lambda mixing: mixing.clamp(0.0, 1.0))]

    def clamp_mixing_(self) -> None:
        """Project the mixing matrix onto [0, 1]."""
        self.constrain_()

    def linear_core(self, q, k, v, **kwargs):
        return mhla_attention(q, k, v, self.block_index, self.mixing, **kwargs)

    def gate(self, x, out):
        return out if self.gate_proj is None else out * F.silu(self.gate_proj(x))

    def extra_macs(self) -> int:
        return 0 if self.gate_proj is None else self.num_tokens * self.dim**2

    def core_macs(self) -> int:
        width = self.head_dim + int(self.normalize)
        num_blocks = math.prod(self.layout)
        summaries = 2 * self.num_tokens * self.head_dim * width
        return self.num_heads * (summaries + num_blocks**2 * self.head_dim * width)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout}, normalize={self.normalize}"


class HLAAttention(AttentionLayer):
    """Hadamard linear attention: the product of p factor similarity matrices.

    Settings:
        order: p in 1..4 (p = 1 is linear attention).
        factors: "tied" — Taylor factors φ(x) = [1, x·W/√(p·√d)] shared by all p factors
            (W = identity when ``rank`` is null, else a learned d×rank map), so each
            factor is 1 + s/p and the product (1 + s/p)^p → exp(s); or "untied" — p learned
            maps d→rank per side followed by a positive activation.
        rank: factor rank r (null = d for tied Taylor factors).
        activation: positive activation of untied factors, "elu" (elu+1) or "softplus".
        normalize: divide by the row sums, or not + per-head output RMSNorm.
    """

    variant = "hla"
    FACTORS = ("tied", "untied")
    ACTIVATIONS = ("elu", "softplus")

    def __init__(
        self,
        dim,
        num_heads,
        grid,
        *,
        order=2,
        factors="tied",
        rank=None,
        activation="elu",
        normalize=True,
        eps=1e-6,
    ):
        super().__init__(dim, num_heads, grid)
        _choice("attention.hla.order", order, (1, 2, 3, 4))
        _choice("attention.hla.factors", factors, self.FACTORS)
        _choice("attention.hla.activation", activation, self.ACTIVATIONS)
        if rank is not None and not (isinstance(rank, int) and 1 <= rank <= self.head_dim):
            raise ValueError(
                f"attention.hla.rank={rank!r} is not valid; use null or an integer in [1, {self.head_dim}] "
                f"(the head size)"
            )
        self.order, self.factors, self.activation = order, factors, activation
        self.normalize, self.eps = bool(normalize), float(eps)
        self.rank = self.head_dim if rank is None else rank
        if factors == "tied":
            self.down = None if rank is None else nn.Linear(self.head_dim, rank, bias=False)
            if self.down is not None:  # semi-orthogonal, scaled so (qW)·(kW) ≈ q·k on average
                nn.init.orthogonal_(self.down.weight)
                self.down.weight.data.mul_(math.sqrt(self.head_dim / rank))
        else:
            self.q_maps = nn.ModuleList(nn.Linear(self.head_dim, self.rank) for _ in range(order))
            self.k_maps = nn.ModuleList(nn.Linear(self.head_dim, self.rank) for _ in range(order))
        self.out_norm = None if self.normalize else nn.RMSNorm(self.head_dim, eps=1e-6)

    @property
    def factor_rank(self) -> int:
        """r_m: width of each factor (tied Taylor factors carry the extra constant 1)."""
        return self.rank + 1 if self.factors == "tied" else self.rank

    def _taylor_factor(self, x: Tensor) -> Tensor:
        """(B, h, N, d) -> (B, h, N, r + 1): [1, x·W / √(p·√d)]."""
        if self.down is not None:
            x = self.down(x)
        x = x / math.sqrt(self.order * math.sqrt(self.head_dim))
        return torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)

    def _positive(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0 if self.activation == "elu" else F.softplus(x)

    def core(self, q, k, v, rope):
        if rope is not None:
            q, k = rope(q), rope(k)
        if self.factors == "tied":
            q_factor, k_factor = self._taylor_factor(q), self._taylor_factor(k)
            q_factors, k_factors = [q_factor] * self.order, [k_factor] * self.order
        else:
            q_factors = [self._positive(m(q)) for m in self.q_maps]
            k_factors = [self._positive(m(k)) for m in self.k_maps]
        out = hla_attention(q_factors, k_factors, v, normalize=self.normalize, eps=self.eps)
        return out if self.out_norm is None else self.out_norm(out)

    def core_macs(self) -> int:
        width = self.head_dim + int(self.normalize)
        kron = self.factor_rank**self.order
        return 2 * self.num_heads * self.num_tokens * kron * width

    def extra_macs(self) -> int:
        if self.factors == "tied":
            maps = 0 if self.down is None else 2  # one shared map, applied to q and k
        else:
            maps = 2 * self.order
        return maps * self.num_heads * self.num_tokens * self.head_dim * self.rank

    def extra_repr(self) -> str:
        return super().extra_repr() + f", order={self.order}, factors={self.factors}, rank={self.rank}"
