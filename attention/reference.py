"""Quadratic reference oracles for every attention core.

Each function builds the explicit N x N attention weight matrix ``A`` and returns
``A @ v`` (optionally normalised by the guarded row sums of ``A``, the same guard as
the efficient cores: :func:`attention.functional.guard_denominator`). They are slow and
obviously correct; tests compare the efficient forms in :mod:`attention.functional`
and :mod:`attention.mhla` against them. Arguments and shapes are exactly those of
the efficient functions:

    q, k: (B, H, N, d)    v: (B, H, N, d_v)    output: (B, H, N, d_v), input dtype

All arithmetic is done in float64 so the oracle is never the source of error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .functional import guard_denominator


def _apply_weights(weights: Tensor, v: Tensor, normalize: bool, eps: float, row_sums: Tensor | None = None) -> Tensor:
    """weights (B, H, N, N) float64, v (B, H, N, d_v) -> (B, H, N, d_v) in v's dtype.

    ``row_sums`` (B, H, N, 1) replaces the row sums of ``weights`` in the normaliser.
    """
    out = weights @ v.double()
    if normalize:
        sums = weights.sum(dim=-1, keepdim=True) if row_sums is None else row_sums
        out = out / guard_denominator(sums, eps)
    return out.to(v.dtype)


def _row_sums(normalizer_q: Tensor | None, normalizer_k: Tensor | None, scale: Tensor | None = None) -> Tensor | None:
    """Row sums (B, H, N, 1) of the explicit normaliser weights n_q n_kᵀ (⊙ scale), None without features."""
    if normalizer_q is None:
        return None
    weights = normalizer_q.double() @ normalizer_k.double().transpose(-1, -2)
    return (weights if scale is None else weights * scale).sum(dim=-1, keepdim=True)


def softmax_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v with the weights built explicitly."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return _apply_weights(torch.softmax(logits, dim=-1), v, normalize=False, eps=0.0)


def linear_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    normalizer_q: Tensor | None = None,
    normalizer_k: Tensor | None = None,
) -> Tensor:
    """A = q kᵀ (q, k already feature-mapped); o = A v / guard(Â 1), Â from the normaliser features."""
    weights = q.double() @ k.double().transpose(-1, -2)
    return _apply_weights(weights, v, normalize, eps, _row_sums(normalizer_q, normalizer_k))


def hla_attention_reference(
    q_factors: Sequence[Tensor],
    k_factors: Sequence[Tensor],
    v: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """S = (Q₁K₁ᵀ) ⊙ … ⊙ (Q_pK_pᵀ); o = S v / guard(S 1).

    q_factors, k_factors: p tensors each (B, H, N, r_m).
    """
    if len(q_factors) != len(k_factors) or not q_factors:
        raise ValueError("hla_attention_reference needs the same non-zero number of q and k factors")
    weights = None
    for q_m, k_m in zip(q_factors, k_factors):
        factor = q_m.double() @ k_m.double().transpose(-1, -2)
        weights = factor if weights is None else weights * factor
    return _apply_weights(weights, v, normalize, eps)


def mhla_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_index: Tensor,
    mixing: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    normalizer_q: Tensor | None = None,
    normalizer_k: Tensor | None = None,
) -> Tensor:
    """A[t, s] = mixing[b(t), b(s)] · q_t·k_s; o = A v / guard(Â 1), Â from the normaliser features.

    block_index: (N,) long in [0, M); mixing: (M, M), row i = query block i.
    """
    block_mixing = mixing.double()[block_index][:, block_index]  # (N, N)
    weights = (q.double() @ k.double().transpose(-1, -2)) * block_mixing
    return _apply_weights(weights, v, normalize, eps, _row_sums(normalizer_q, normalizer_k, block_mixing))


def explicit_weights(core, q: Tensor, k: Tensor, grid, rope=None) -> tuple[Tensor, Tensor | None]:
    """The explicit N×N weights a core applies to v, and the row sums it divides by.

    core: an :class:`attention.cores.AttentionCore`; q, k: (B, h, N, d) as the core receives
    them (projected and q/k-normalised); grid, rope: as in the core's forward. Returns
    (weights (B, h, N, N) float64, row sums (B, h, N, 1) float64 or None when the core does not
    normalise — softmax weights are already row-stochastic). The core's output is then
    ``weights @ v / guard(row sums)`` (before its output norm): :func:`reference_core_output`.
    """
    from .mhla import mhla_block_index

    inputs = [t.double() for t in core.core_inputs(q, k, grid, rope)]
    if core.variant == "softmax":
        logits = inputs[0] @ inputs[1].transpose(-1, -2) / math.sqrt(inputs[0].shape[-1])
        return torch.softmax(logits, dim=-1), None
    if core.variant == "hla":
        p = core.order
        pairs = [(inputs[0], inputs[1])] * p if core.factors == "tied" else list(zip(inputs[:p], inputs[p:]))
        weights = math.prod(q_m @ k_m.transpose(-1, -2) for q_m, k_m in pairs)
        return weights, (weights.sum(-1, keepdim=True) if core.normalize else None)
    q_f, k_f, n_q, n_k = core.split_inputs(inputs)
    mask = 1.0
    if core.variant == "mhla":
        index = mhla_block_index(grid, core.layout).to(q_f.device)
        mask = core.mixing.double()[index][:, index]
    weights = (q_f @ k_f.transpose(-1, -2)) * mask
    if not core.normalize:
        return weights, None
    normaliser = weights if n_q is None else (n_q @ n_k.transpose(-1, -2)) * mask
    return weights, normaliser.sum(-1, keepdim=True)


def reference_core_output(core, q: Tensor, k: Tensor, v: Tensor, grid, rope=None) -> Tensor:
    """The output of ``core.core(core.core_inputs(q, k, grid, rope), v, grid)``, from the explicit weights.

    (B, h, N, d) in v's dtype, computed in float64 (the normaliser guarded as in the efficient cores).
    """
    weights, row_sums = explicit_weights(core, q, k, grid, rope)
    return _apply_weights(weights, v, row_sums is not None, core.eps if row_sums is not None else 0.0, row_sums)
