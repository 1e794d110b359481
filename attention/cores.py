"""Attention cores: the part of a self-attention layer that differs between variants.

A core holds only the variant's own parameters (HLA's factor maps, MHLA's mixing
matrix and gate, the output RMSNorm of un-normalised variants) and works on per-head
q, k, v (B, h, N, d) that are already projected and q/k-normalised, so it can sit
behind any projections (:class:`attention.layers.AttentionLayer`, or a pretrained
model's own). Three steps, each public:

    core_inputs(q, k, grid, rope) -> the tensors the functional core consumes
        (features / Taylor or learned factors, with RoPE applied as the variant needs)
    core(inputs, v, grid)         -> (B, h, N, d): only the functional core
    forward(q, k, v, grid, rope)  =  output norm ∘ core ∘ core_inputs

plus ``gate(x, out)`` on (B, N, C) (identity unless the variant has a gate) and
``macs(grid)``. The token grid (T, H, W) is given per call as python ints; RoPE tables
(:class:`attention.rope.RotaryTables`) too.

How RoPE combines with each variant:
- softmax, HLA: q and k are rotated before the core (for HLA, before the factor
  maps, so tied Taylor factors approximate softmax *with* RoPE);
- linear, MHLA: the features φ(q), φ(k) are rotated after the feature map and used
  in the numerator only; the normaliser (if any) keeps the un-rotated features, so
  ``core_inputs`` returns (φ(q)ᴿ, φ(k)ᴿ, φ(q), φ(k)) in that case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .constraints import Constrained, unit_interval
from .functional import (
    hla_attention,
    hla_tied_attention,
    linear_attention,
    softmax_attention,
)
from .mhla import (
    Grid,
    check_grid,
    mhla_auto_layout,
    mhla_grid_attention,
    mhla_locality_mixing,
)
from .rope import RotaryTables, apply_rope, rope_axis_dims


def choice(setting: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{setting}={value!r} is not valid; choose one of {list(choices)}")


def _rotated(x: Tensor, rope: RotaryTables | None) -> Tensor:
    return x if rope is None else apply_rope(x, rope)


class AttentionCore(nn.Module):
    """Base class of the variant cores.

    Args:
        dim: model width C (divisible by ``num_heads``).
        num_heads: number of heads h; head size d = C / h must be even and ≥ 6 (RoPE).
        grid: optional reference token grid (T, H, W), for settings that need one.
    """

    variant = "base"

    def __init__(self, dim: int, num_heads: int, grid: Grid | None = None):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"attention: dim={dim} must be divisible by num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        rope_axis_dims(self.head_dim)  # raises for head sizes RoPE cannot split
        self.out_norm: nn.Module | None = None

    def core_inputs(self, q: Tensor, k: Tensor, grid: Grid, rope: RotaryTables | None = None) -> tuple[Tensor, ...]:
        """q, k (B, h, N, d), already q/k-normalised -> the tensors :meth:`core` consumes."""
        raise NotImplementedError

    def core(self, inputs: tuple[Tensor, ...], v: Tensor, grid: Grid) -> Tensor:
        """Only the functional core(s) on ``core_inputs``' output and v (B, h, N, d) -> (B, h, N, d)."""
        raise NotImplementedError

    def forward(self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, rope: RotaryTables | None = None) -> Tensor:
        """q, k, v (B, h, N, d) on the token grid (T, H, W) -> (B, h, N, d)."""
        out = self.core(self.core_inputs(q, k, grid, rope), v, grid)
        return out if self.out_norm is None else self.out_norm(out)

    def gate(self, x: Tensor, out: Tensor) -> Tensor:
        """Output gate applied before the output projection; identity by default. x, out: (B, N, C)."""
        return out

    def core_macs(self, grid: Grid) -> int:
        """Multiply-accumulates of the functional core per sample, all heads."""
        raise NotImplementedError

    def extra_macs(self, grid: Grid) -> int:
        """Multiply-accumulates per sample of variant-specific maps (factor maps, gates)."""
        return 0

    def macs(self, grid: Grid) -> int:
        """Multiply-accumulates per sample of the core and the variant's own maps on a grid."""
        return self.core_macs(grid) + self.extra_macs(grid)

    def extra_repr(self) -> str:
        return f"variant={self.variant}, dim={self.dim}, heads={self.num_heads}"


class SoftmaxCore(AttentionCore):
    """softmax(q kᵀ/√d) v with RoPE on q, k; SDPA kernels."""

    variant = "softmax"

    def core_inputs(self, q, k, grid, rope=None):
        return _rotated(q, rope), _rotated(k, rope)

    def core(self, inputs, v, grid):
        q, k = inputs
        return softmax_attention(q, k, v)

    def core_macs(self, grid):
        return 2 * self.num_heads * math.prod(grid) ** 2 * self.head_dim


class FeatureMapCore(AttentionCore):
    """Linear-style core: positive features, RoPE in the numerator, optional output RMSNorm."""

    FEATURE_MAPS = ("relu", "elu")

    def __init__(self, dim, num_heads, grid=None, *, feature_map: str, normalize: bool, eps: float):
        super().__init__(dim, num_heads, grid)
        choice(f"attention.{self.variant}.feature_map", feature_map, self.FEATURE_MAPS)
        self.feature_map, self.normalize, self.eps = feature_map, bool(normalize), float(eps)
        if not self.normalize:
            self.out_norm = nn.RMSNorm(self.head_dim, eps=1e-6)

    def features(self, x: Tensor) -> Tensor:
        """Positive feature map φ applied after the qk RMSNorm."""
        if self.feature_map == "relu":
            return F.relu(x) + 1e-6
        return F.elu(x) + 1.0

    def core_inputs(self, q, k, grid, rope=None):
        """(φ(q), φ(k)); with RoPE (φ(q)ᴿ, φ(k)ᴿ) and, when normalising, the un-rotated φ(q), φ(k)."""
        q, k = self.features(q), self.features(k)
        if rope is None:
            return q, k
        rotated = apply_rope(q, rope), apply_rope(k, rope)
        return (*rotated, q, k) if self.normalize else rotated

    @staticmethod
    def split_inputs(inputs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(q, k, normaliser q or None, normaliser k or None) from ``core_inputs``' output."""
        if len(inputs) == 4:
            return inputs[0], inputs[1], inputs[2], inputs[3]
        return inputs[0], inputs[1], None, None

    def value_width(self) -> int:
        return self.head_dim + int(self.normalize)


class LinearCore(FeatureMapCore):
    """Plain kernelised linear attention (the baseline): A = φ(q) φ(k)ᵀ."""

    variant = "linear"

    def __init__(self, dim, num_heads, grid=None, *, feature_map="relu", normalize=True, eps=1e-6):
        super().__init__(dim, num_heads, grid, feature_map=feature_map, normalize=normalize, eps=eps)

    def core(self, inputs, v, grid):
        q, k, nq, nk = self.split_inputs(inputs)
        return linear_attention(q, k, v, normalize=self.normalize, eps=self.eps, normalizer_q=nq, normalizer_k=nk)

    def core_macs(self, grid):
        return 2 * self.num_heads * math.prod(grid) * self.head_dim * self.value_width()


class MHLACore(FeatureMapCore, Constrained):
    """Multi-head linear attention: heads along the token axis with a learned block mixing.

    Settings:
        layout: "auto" (resolved once from the reference grid) or (Mt, Mh, Mw) block
            counts along T, H, W. On any grid, token (t, h, w) is in block
            (t·Mt // T, h·Mh // H, w·Mw // W): equal windows where the layout divides
            the grid, uneven (or empty) blocks elsewhere.
        mixing_init: "locality" (paper) or "uniform".
        normalize: divide by the mixed normaliser (Eq. 4), or not + per-head output RMSNorm.
        gate: multiply the output by SiLU(W_g x) before the output projection.
    The mixing matrix is kept in [0, 1] through :class:`attention.constraints.Constrained`.
    """

    variant = "mhla"
    MIXING_INITS = ("locality", "uniform")

    def __init__(
        self,
        dim,
        num_heads,
        grid=None,
        *,
        layout="auto",
        mixing_init="locality",
        normalize=False,
        gate=False,
        feature_map="relu",
        eps=1e-6,
    ):
        super().__init__(dim, num_heads, grid, feature_map=feature_map, normalize=normalize, eps=eps)
        self.layout: Grid = self.resolve_layout(layout, grid)
        choice("attention.mhla.mixing_init", mixing_init, self.MIXING_INITS)
        num_blocks = math.prod(self.layout)
        if mixing_init == "locality":
            mixing = mhla_locality_mixing(self.layout)
        else:
            mixing = torch.full((num_blocks, num_blocks), 1.0 / num_blocks)
        self.mixing = nn.Parameter(mixing)
        self.gate_proj = nn.Linear(dim, dim) if gate else None

    @staticmethod
    def resolve_layout(layout, grid: Grid | None) -> Grid:
        """The block counts (Mt, Mh, Mw): explicit, or ``auto`` from the reference grid."""
        if layout == "auto":
            if grid is None:
                raise ValueError(
                    "attention.mhla.layout='auto' needs a reference token grid (T, H, W) to choose the blocks; "
                    "pass grid=... when building the attention, or set an explicit layout [Mt, Mh, Mw]"
                )
            return mhla_auto_layout(check_grid(tuple(grid), "attention grid"))
        message = (
            f"attention.mhla.layout={layout!r} is not valid; use 'auto' or three positive block counts "
            f"[Mt, Mh, Mw] (any grid size works: uneven blocks where the layout does not divide it)"
        )
        if isinstance(layout, str) or not isinstance(layout, Sequence) or len(layout) != 3:
            raise ValueError(message)
        if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in layout):
            raise ValueError(message)
        return tuple(int(m) for m in layout)

    def constraints(self):
        """The mixing matrix is projected onto [0, 1] after every optimizer step."""
        return [(self.mixing, unit_interval)]

    def core(self, inputs, v, grid):
        q, k, nq, nk = self.split_inputs(inputs)
        return mhla_grid_attention(
            q, k, v, grid, self.layout, self.mixing, normalize=self.normalize, eps=self.eps,
            normalizer_q=nq, normalizer_k=nk,
        )

    def gate(self, x, out):
        return out if self.gate_proj is None else out * F.silu(self.gate_proj(x))

    def extra_macs(self, grid):
        return 0 if self.gate_proj is None else math.prod(grid) * self.dim**2

    def core_macs(self, grid):
        width = self.value_width()
        summaries = 2 * math.prod(grid) * self.head_dim * width
        return self.num_heads * (summaries + math.prod(self.layout) ** 2 * self.head_dim * width)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", layout={self.layout}, normalize={self.normalize}"


class HLACore(AttentionCore):
    """Hadamard linear attention: the product of p factor similarity matrices.

    Settings:
        order: p in 1..4 (p = 1 is linear attention); tied factors need an even p.
        factors: "tied" — Taylor factors φ(x) = [1, x·W/√(p·√d)] shared by all p factors
            (W = identity when ``rank`` is null, else a learned d×rank map), so each
            factor is 1 + s/p and the product (1 + s/p)^p → exp(s) (≥ 0 for even p only);
            or "untied" — p learned maps d→rank per side followed by a positive activation.
        rank: factor rank r (null = d for tied Taylor factors).
        activation: positive activation of untied factors, "elu" (elu+1) or "softplus".
        normalize: divide by the row sums, or not + per-head output RMSNorm.
        form: how the core runs: "symmetric" (tied only: C(r+p, p) symmetric features),
            "state" or "value_modulation" (Kronecker forms), or "auto" (symmetric for tied
            factors, state for untied).
    """

    variant = "hla"
    ORDERS = (1, 2, 3, 4)
    FACTORS = ("tied", "untied")
    ACTIVATIONS = ("elu", "softplus")
    FORMS = ("auto", "symmetric", "state", "value_modulation")

    def __init__(
        self,
        dim,
        num_heads,
        grid=None,
        *,
        order=2,
        factors="tied",
        rank=None,
        activation="elu",
        normalize=True,
        eps=1e-6,
        form="auto",
    ):
        super().__init__(dim, num_heads, grid)
        choice("attention.hla.order", order, self.ORDERS)
        choice("attention.hla.factors", factors, self.FACTORS)
        if factors == "tied" and order % 2:
            raise ValueError(
                f"attention.hla.order={order} is not valid with attention.hla.factors=tied (odd orders give "
                f"negative attention weights); choose one of [2, 4], or attention.hla.factors=untied for "
                f"{list(self.ORDERS)}"
            )
        choice("attention.hla.activation", activation, self.ACTIVATIONS)
        choice("attention.hla.form", form, self.FORMS)
        if form == "symmetric" and factors != "tied":
            raise ValueError(
                "attention.hla.form='symmetric' is not valid with attention.hla.factors=untied; "
                "choose one of ['auto', 'state', 'value_modulation']"
            )
        if rank is not None and not (isinstance(rank, int) and 1 <= rank <= self.head_dim):
            raise ValueError(
                f"attention.hla.rank={rank!r} is not valid; use null or an integer in [1, {self.head_dim}] "
                f"(the head size)"
            )
        self.order, self.factors, self.activation = order, factors, activation
        self.normalize, self.eps = bool(normalize), float(eps)
        self.form = ("symmetric" if factors == "tied" else "state") if form == "auto" else form
        self.rank = self.head_dim if rank is None else rank
        if factors == "tied":
            self.down = None if rank is None else nn.Linear(self.head_dim, rank, bias=False)
            if self.down is not None:  # semi-orthogonal, scaled so (qW)·(kW) ≈ q·k on average
                nn.init.orthogonal_(self.down.weight)
                self.down.weight.data.mul_(math.sqrt(self.head_dim / rank))
        else:
            self.q_maps = nn.ModuleList(nn.Linear(self.head_dim, self.rank) for _ in range(order))
            self.k_maps = nn.ModuleList(nn.Linear(self.head_dim, self.rank) for _ in range(order))
        if not self.normalize:
            self.out_norm = nn.RMSNorm(self.head_dim, eps=1e-6)

    @property
    def factor_rank(self) -> int:
        """r_m: width of each factor (tied Taylor factors carry the extra constant 1)."""
        return self.rank + 1 if self.factors == "tied" else self.rank

    @property
    def feature_dim(self) -> int:
        """R: features per token the core's state is built on."""
        if self.form == "symmetric":
            return math.comb(self.factor_rank + self.order - 1, self.order)
        return self.factor_rank**self.order

    def taylor_factor(self, x: Tensor) -> Tensor:
        """(B, h, N, d) -> (B, h, N, r + 1): [1, x·W / √(p·√d)]."""
        if self.down is not None:
            x = self.down(x)
        x = x / math.sqrt(self.order * math.sqrt(self.head_dim))
        return torch.cat([torch.ones_like(x[..., :1]), x], dim=-1)

    def positive(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0 if self.activation == "elu" else F.softplus(x)

    def core_inputs(self, q, k, grid, rope=None):
        """Tied: (Q, K) Taylor factors of the rotated q, k; untied: (Q₁…Q_p, K₁…K_p)."""
        q, k = _rotated(q, rope), _rotated(k, rope)
        if self.factors == "tied":
            return self.taylor_factor(q), self.taylor_factor(k)
        return (*[self.positive(m(q)) for m in self.q_maps], *[self.positive(m(k)) for m in self.k_maps])

    def core(self, inputs, v, grid):
        if self.factors == "tied":
            q_factor, k_factor = inputs
            return hla_tied_attention(
                q_factor, k_factor, v, self.order, normalize=self.normalize, eps=self.eps, form=self.form
            )
        p = self.order
        return hla_attention(inputs[:p], inputs[p:], v, normalize=self.normalize, eps=self.eps, form=self.form)

    def core_macs(self, grid):
        width = self.head_dim + int(self.normalize)
        return 2 * self.num_heads * math.prod(grid) * self.feature_dim * width

    def extra_macs(self, grid):
        if self.factors == "tied":
            maps = 0 if self.down is None else 2  # one shared map, applied to q and k
        else:
            maps = 2 * self.order
        return maps * self.num_heads * math.prod(grid) * self.head_dim * self.rank

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", order={self.order}, factors={self.factors}, rank={self.rank}, form={self.form}"
        )
