"""Efficient attention cores: softmax (SDPA), linear and HLA (MHLA lives in :mod:`attention.mhla`).

Every function takes per-head tensors laid out (B, H, N, ·) and returns
(B, H, N, d_v) in the dtype of ``v``. The linear-time cores never build an N x N
tensor; their states and normalisers are accumulated in float32 when the inputs
are bf16/fp16 (float64 inputs stay float64), with autocast disabled inside.
Where an intermediate would grow like N·R (HLA's Kronecker or symmetric features)
the token axis is processed in chunks, and under autograd each chunk's features are
recomputed in backward instead of being stored.

The quadratic oracles with identical arguments live in :mod:`attention.reference`.

"Normalised" output is o_i = Σ_j A_ij v_j / guard(Σ_j A_ij), see :func:`guard_denominator`:
for non-negative row sums this is exactly Σ_j A_ij v_j / (Σ_j A_ij + eps).
Un-normalised output is Σ_j A_ij v_j.

Nothing here reads tensor values on the host or branches on them, so every core
traces into one graph under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .symmetric import tied_state_form

# Largest number of elements an N·R-sized intermediate may hold per chunk, across batch
# and heads: 2**22 float32 = 16 MiB on CPU (cache-friendly); on accelerators a larger
# budget (256 MiB) gives few, large GEMMs.
CHUNK_ELEMENTS_CPU = 2**22
CHUNK_ELEMENTS_ACCELERATOR = 2**26

HLA_FORMS = ("state", "value_modulation")
HLA_TIED_FORMS = ("symmetric", "state", "value_modulation")


# ----------------------------------------------------------------------------- helpers


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def guard_denominator(denominator: Tensor, eps: float) -> Tensor:
    """Row sums made safe to divide by: keep the sign, push the magnitude out by eps.

    den ≥ 0 → den + eps (the spec's Σ A + eps); den < 0 → den − eps. The magnitude is
    always ≥ eps, so no row sum (zero, tiny, or negative from signed weights or
    rounding) can give Inf or NaN. Callers pass float32/float64 row sums (never bf16),
    and for non-negative weights |o| ≤ max |v| still holds, so the cast back to a low
    precision cannot overflow.
    """
    return torch.where(denominator >= 0, denominator + eps, denominator - eps)


def _values_with_ones(v: Tensor, normalize: bool) -> Tensor:
    """(B, H, N, d_v) -> (B, H, N, d_v + 1) with a ones column when normalising."""
    if not normalize:
        return v
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _finish(out: Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> Tensor:
    """Split off the normaliser column (if any), divide by the guarded row sums, cast back."""
    if normalize:
        out = out[..., :-1] / guard_denominator(out[..., -1:], eps)
    return out.to(dtype)


def chunk_elements(device: torch.device) -> int:
    """Element budget of one N·R chunk on this device."""
    return CHUNK_ELEMENTS_CPU if device.type == "cpu" else CHUNK_ELEMENTS_ACCELERATOR


def _chunk_length(num_tokens: int, elements_per_token: int, chunk_size: int | None, device: torch.device) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        return chunk_size
    return max(1, min(num_tokens, chunk_elements(device) // max(1, elements_per_token)))


def _run_chunk(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """Call ``fn(*args)``; under autograd recompute it in backward instead of storing."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _token_chunks(x: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """Split the token axis (dim -2) once.

    One split (instead of slicing per chunk) gives a single gradient concatenation in
    backward rather than one zero-filled full-size gradient per chunk.
    """
    return x.split(chunk, dim=-2)


def _sum_over_chunks(fn: Callable[..., Tensor], tensors: Sequence[Tensor], chunk: int) -> Tensor:
    """Σ over token chunks of fn(*chunk of each tensor): pass 1 of every chunked core."""
    total = None
    for pieces in zip(*[_token_chunks(t, chunk) for t in tensors]):
        part = _run_chunk(fn, *pieces)
        total = part if total is None else total + part
    return total


def _readout_over_chunks(fn: Callable[..., Tensor], state: Tensor, tensors: Sequence[Tensor], chunk: int) -> Tensor:
    """fn(state, *chunk of each tensor) for every token chunk, concatenated along tokens: pass 2."""
    pieces = zip(*[_token_chunks(t, chunk) for t in tensors])
    return torch.cat([_run_chunk(fn, state, *chunk_pieces) for chunk_pieces in pieces], dim=-2)


def check_same_tokens(name: str, *tensors: Tensor) -> None:
    shapes = [tuple(t.shape[:3]) for t in tensors]
    if any(t.dim() != 4 for t in tensors) or len(set(shapes)) != 1:
        raise ValueError(
            f"{name}: all inputs must be (B, H, N, ·) with the same B, H, N; got shapes "
            f"{[tuple(t.shape) for t in tensors]}"
        )


def normalizer_features(
    q: Tensor, k: Tensor, normalizer_q: Tensor | None, normalizer_k: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The features of the row sums: ``normalizer_q/k`` where given (un-rotated features), else q, k."""
    if (normalizer_q is None) != (normalizer_k is None):
        raise ValueError("normalizer_q and normalizer_k must be given together")
    if normalizer_q is None:
        return q, k
    if normalizer_q.shape != q.shape or normalizer_k.shape != k.shape:
        raise ValueError(
            f"normalizer features must have the shapes of q and k, got {tuple(normalizer_q.shape)} and "
            f"{tuple(normalizer_k.shape)} for {tuple(q.shape)} and {tuple(k.shape)}"
        )
    return normalizer_q, normalizer_k


# ----------------------------------------------------------------------------- softmax


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v via ``F.scaled_dot_product_attention``.

    q, k: (B, H, N, d); v: (B, H, N, d_v) -> (B, H, N, d_v). Uses FlashAttention /
    memory-efficient kernels on GPU and the fused kernel on CPU.
    """
    check_same_tokens("softmax_attention", q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------- linear


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    normalizer_q: Tensor | None = None,
    normalizer_k: Tensor | None = None,
) -> Tensor:
    """Kernelised linear attention with A = q kᵀ (q, k already feature-mapped).

    q, k: (B, H, N, d) features; v: (B, H, N, d_v) -> (B, H, N, d_v). State G = kᵀ v of
    shape (B, H, d, d_v), then q G; the row sums are n_q · Σ_s n_k[s] with the normaliser
    features n_q, n_k = ``normalizer_q``, ``normalizer_k`` (B, H, N, d) when given (RoPE:
    rotated features in the numerator, un-rotated ones here), else q, k. Cost ≈
    4·N·d·(d_v+1) FLOPs per head; memory O(N·(d + d_v)).
    """
    check_same_tokens("linear_attention", q, k, v)
    nq, nk = normalizer_features(q, k, normalizer_q, normalizer_k)
    acc = accumulation_dtype(v.dtype)
    with no_autocast(q.device):
        state = k.to(acc).transpose(-1, -2) @ v.to(acc)  # (B, H, d, d_v)
        out = q.to(acc) @ state  # (B, H, N, d_v)
        if normalize:
            key_sum = nk.to(acc).sum(dim=-2).unsqueeze(-1)  # (B, H, d, 1)
            out = out / guard_denominator(nq.to(acc) @ key_sum, eps)
    return out.to(v.dtype)


# ----------------------------------------------------------------------------- HLA


def _kronecker_features(factors: Sequence[Tensor]) -> Tensor:
    """Row-wise Kronecker product: p tensors (..., n, r_m) -> (..., n, ∏ r_m)."""
    out = factors[0]
    for factor in factors[1:]:
        out = (out.unsqueeze(-1) * factor.unsqueeze(-2)).flatten(-2)
    return out


def _hla_state_form(
    features: Callable[[Sequence[Tensor]], Tensor],
    qf: Sequence[Tensor],
    kf: Sequence[Tensor],
    values: Tensor,
    chunk: int,
) -> Tensor:
    """State form: T = features(K)ᵀ [v, 1] of shape (B, H, R, C), then features(Q) T."""
    p = len(kf)

    def state_of_chunk(*chunk_tensors: Tensor) -> Tensor:
        return features(chunk_tensors[:p]).transpose(-1, -2) @ chunk_tensors[p]

    def readout_of_chunk(state: Tensor, *q_chunk: Tensor) -> Tensor:
        return features(q_chunk) @ state

    state = _sum_over_chunks(state_of_chunk, [*kf, values], chunk)
    return _readout_over_chunks(readout_of_chunk, state, qf, chunk)


def _hla_value_modulation_form(qf: Sequence[Tensor], kf: Sequence[Tensor], values: Tensor, chunk: int) -> Tensor:
    """No-reshape form: peel factors 2..p into the values, run linear attention on factor 1.

    Factor m > 1 turns the product into a sum over b of linear attentions whose values
    are scaled by K_m[:, b] and whose outputs are scaled by Q_m[:, b]. All tensors stay
    (B, H, n, ·); the modulated values have width r_2···r_p·C.
    """
    p = len(kf)

    def state_of_chunk(*chunk_tensors: Tensor) -> Tensor:
        k_chunk, modulated = chunk_tensors[:p], chunk_tensors[p]
        for k_m in reversed(k_chunk[1:]):  # width becomes (r_2, …, r_p, C) flattened
            modulated = (k_m.unsqueeze(-1) * modulated.unsqueeze(-2)).flatten(-2)
        return k_chunk[0].transpose(-1, -2) @ modulated  # (B, H, r_1, r_2···r_p·C)

    def readout_of_chunk(state: Tensor, *q_chunk: Tensor) -> Tensor:
        out = q_chunk[0] @ state  # (B, H, n, r_2···r_p·C)
        for q_m in q_chunk[1:]:
            out = (out.unflatten(-1, (q_m.shape[-1], -1)) * q_m.unsqueeze(-1)).sum(-2)
        return out

    state = _sum_over_chunks(state_of_chunk, [*kf, values], chunk)
    return _readout_over_chunks(readout_of_chunk, state, qf, chunk)


def hla_attention(
    q_factors: Sequence[Tensor],
    k_factors: Sequence[Tensor],
    v: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    form: str = "state",
    chunk_size: int | None = None,
) -> Tensor:
    """Hadamard linear attention: S = (Q₁K₁ᵀ) ⊙ … ⊙ (Q_pK_pᵀ), o = S v / guard(S 1).

    q_factors, k_factors: p tensors each (B, H, N, r_m), already feature-mapped;
    v: (B, H, N, d_v) -> (B, H, N, d_v). Equal to linear attention on row-wise
    Kronecker features of dimension R = ∏ r_m, computed in O(N·R·(d_v+1)) time with a
    state of size R·(d_v+1). ``form`` picks the "state" (Kronecker) form — the faster
    one in our benchmarks (docs/benchmarks.md) — or the "value_modulation" form.
    ``chunk_size`` (tokens per chunk) defaults to what keeps an N·R intermediate under
    the device's element budget (:func:`chunk_elements`). For p equal factors see
    :func:`hla_tied_attention`, which needs fewer features.
    """
    if len(q_factors) != len(k_factors) or not q_factors:
        raise ValueError(
            f"hla_attention needs the same non-zero number of q and k factors, got "
            f"{len(q_factors)} and {len(k_factors)}"
        )
    for q_m, k_m in zip(q_factors, k_factors):
        check_same_tokens("hla_attention", q_m, k_m, v)
        if q_m.shape[-1] != k_m.shape[-1]:
            raise ValueError(f"hla_attention: factor ranks differ: {q_m.shape} vs {k_m.shape}")
    if form not in HLA_FORMS:
        raise ValueError(f"hla_attention: unknown form {form!r}; valid forms: {HLA_FORMS}")

    batch, heads, num_tokens, d_v = v.shape
    rank = math.prod([q.shape[-1] for q in q_factors])
    width = d_v + 1 if normalize else d_v
    per_token = rank if form == "state" else max(rank, rank // q_factors[0].shape[-1] * width)
    chunk = _chunk_length(num_tokens, batch * heads * per_token, chunk_size, v.device)

    acc = accumulation_dtype(v.dtype)
    with no_autocast(v.device):
        qf = [q.to(acc) for q in q_factors]
        kf = [k.to(acc) for k in k_factors]
        values = _values_with_ones(v.to(acc), normalize)
        if form == "state":
            out = _hla_state_form(_kronecker_features, qf, kf, values, chunk)
        else:
            out = _hla_value_modulation_form(qf, kf, values, chunk)
    return _finish(out, normalize, eps, v.dtype)


def hla_tied_attention(
    q_factor: Tensor,
    k_factor: Tensor,
    v: Tensor,
    order: int,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    form: str = "symmetric",
    chunk_size: int | None = None,
) -> Tensor:
    """HLA with p = ``order`` equal factors: S = (Q Kᵀ)^⊙p, o = S v / guard(S 1).

    q_factor, k_factor: (B, H, N, w); v: (B, H, N, d_v) -> (B, H, N, d_v). Equal to
    ``hla_attention([q_factor] * p, [k_factor] * p, v)``. The "symmetric" form runs the
    state form on symmetric tensor-power features (C(w + p − 1, p) features instead of
    w^p, :mod:`attention.symmetric`; it has no double backward); "state" and
    "value_modulation" are :func:`hla_attention`'s Kronecker forms.
    """
    if form not in HLA_TIED_FORMS:
        raise ValueError(f"hla_tied_attention: unknown form {form!r}; valid forms: {HLA_TIED_FORMS}")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"hla_tied_attention: order must be a positive integer, got {order!r}")
    if form != "symmetric":
        return hla_attention(
            [q_factor] * order, [k_factor] * order, v, normalize=normalize, eps=eps, form=form, chunk_size=chunk_size
        )
    check_same_tokens("hla_tied_attention", q_factor, k_factor, v)
    if q_factor.shape[-1] != k_factor.shape[-1]:
        raise ValueError(f"hla_tied_attention: factor ranks differ: {q_factor.shape} vs {k_factor.shape}")

    batch, heads, num_tokens, _ = v.shape
    num_features = math.comb(q_factor.shape[-1] + order - 1, order)
    chunk = _chunk_length(num_tokens, batch * heads * num_features, chunk_size, v.device)

    acc = accumulation_dtype(v.dtype)
    with no_autocast(v.device):
        values = _values_with_ones(v.to(acc), normalize)
        out = tied_state_form(q_factor.to(acc), k_factor.to(acc), values, order, chunk)
    return _finish(out, normalize, eps, v.dtype)
