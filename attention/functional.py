"""Efficient attention cores: softmax (SDPA), linear, HLA and MHLA.

Every function takes per-head tensors laid out (B, H, N, ·) and returns
(B, H, N, d_v) in the dtype of ``v``. The linear-time cores never build an N x N
tensor; their states and normalisers are accumulated in float32 when the inputs
are bf16/fp16 (float64 inputs stay float64), with autocast disabled inside.
Where an intermediate would grow like N·R (HLA's Kronecker features, MHLA's
per-token outer products in the ragged case) the token axis is processed in
chunks, and under autograd each chunk is recomputed in backward instead of
being stored.

The quadratic oracles with identical arguments live in :mod:`attention.reference`.

"Normalised" output is o_i = Σ_j A_ij v_j / (Σ_j A_ij + eps), computed in one
pass by appending a column of ones to v; un-normalised output is Σ_j A_ij v_j.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# Largest number of elements an N·R-sized intermediate may hold per chunk
# (2**22 float32 = 16 MiB), across batch and heads.
CHUNK_ELEMENTS = 2**22

HLA_FORMS = ("state", "value_modulation")


# ----------------------------------------------------------------------------- helpers


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _values_with_ones(v: Tensor, normalize: bool) -> Tensor:
    """(B, H, N, d_v) -> (B, H, N, d_v + 1) with a ones column when normalising."""
    if not normalize:
        return v
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _finish(out: Tensor, normalize: bool, eps: float, dtype: torch.dtype) -> Tensor:
    """Split off the normaliser column (if any), divide, cast back to the input dtype."""
    if normalize:
        out = out[..., :-1] / (out[..., -1:] + eps)
    return out.to(dtype)


def _chunk_length(num_tokens: int, elements_per_token: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        return chunk_size
    return max(1, min(num_tokens, CHUNK_ELEMENTS // max(1, elements_per_token)))


def _run_chunk(fn: Callable[..., Tensor], *args: Tensor) -> Tensor:
    """Call ``fn(*args)``; under autograd recompute it in backward instead of storing."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _token_chunks(x: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """Split the token axis once: dim -2 of (…, N, c) tensors, dim 0 of (N,) indices.

    One split (instead of slicing per chunk) gives a single gradient concatenation in
    backward rather than one zero-filled full-size gradient per chunk.
    """
    return x.split(chunk, dim=0 if x.dim() == 1 else -2)


def _sum_over_chunks(fn: Callable[..., Tensor], tensors: Sequence[Tensor], chunk: int) -> Tensor:
    """Σ over token chunks of fn(*chunk of each tensor): pass 1 of every chunked core."""
    total = None
    for pieces in zip(*(_token_chunks(t, chunk) for t in tensors)):
        part = _run_chunk(fn, *pieces)
        total = part if total is None else total + part
    return total


def _readout_over_chunks(fn: Callable[..., Tensor], state: Tensor, tensors: Sequence[Tensor], chunk: int) -> Tensor:
    """fn(state, *chunk of each tensor) for every token chunk, concatenated along tokens: pass 2."""
    pieces = zip(*(_token_chunks(t, chunk) for t in tensors))
    return torch.cat([_run_chunk(fn, state, *chunk_pieces) for chunk_pieces in pieces], dim=-2)


def _check_same_tokens(name: str, *tensors: Tensor) -> None:
    shapes = [tuple(t.shape[:3]) for t in tensors]
    if any(t.dim() != 4 for t in tensors) or len(set(shapes)) != 1:
        raise ValueError(
            f"{name}: all inputs must be (B, H, N, ·) with the same B, H, N; got shapes "
            f"{[tuple(t.shape) for t in tensors]}"
        )


# ----------------------------------------------------------------------------- softmax


def softmax_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v via ``F.scaled_dot_product_attention``.

    q, k: (B, H, N, d); v: (B, H, N, d_v) -> (B, H, N, d_v). Uses FlashAttention /
    memory-efficient kernels on GPU and the fused kernel on CPU.
    """
    _check_same_tokens("softmax_attention", q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------- linear


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, *, normalize: bool = True, eps: float = 1e-6
) -> Tensor:
    """Kernelised linear attention with A = q kᵀ (q, k already feature-mapped).

    q, k: (B, H, N, d) non-negative features; v: (B, H, N, d_v) -> (B, H, N, d_v).
    State G = kᵀ [v, 1] of shape (B, H, d, d_v + 1), then q G. Cost ≈ 4·N·d·(d_v+1)
    FLOPs per head; memory O(N·(d + d_v)).
    """
    _check_same_tokens("linear_attention", q, k, v)
    acc = _accumulation_dtype(v.dtype)
    with _no_autocast(q.device):
        values = _values_with_ones(v.to(acc), normalize)
        state = k.to(acc).transpose(-1, -2) @ values  # (B, H, d, C)
        out = q.to(acc) @ state  # (B, H, N, C)
    return _finish(out, normalize, eps, v.dtype)


# ----------------------------------------------------------------------------- HLA


def _kronecker_features(factors: Sequence[Tensor]) -> Tensor:
    """Row-wise Kronecker product: p tensors (..., n, r_m) -> (..., n, ∏ r_m)."""
    out = factors[0]
    for factor in factors[1:]:
        out = (out.unsqueeze(-1) * factor.unsqueeze(-2)).flatten(-2)
    return out


def _hla_state_form(qf: list[Tensor], kf: list[Tensor], values: Tensor, chunk: int) -> Tensor:
    """Kronecker (state) form: T = (⊗K)ᵀ[v,1] of shape (B, H, R, C), then (⊗Q) T."""
    p = len(kf)

    def state_of_chunk(*chunk_tensors: Tensor) -> Tensor:
        return _kronecker_features(chunk_tensors[:p]).transpose(-1, -2) @ chunk_tensors[p]

    def readout_of_chunk(state: Tensor, *q_chunk: Tensor) -> Tensor:
        return _kronecker_features(q_chunk) @ state

    state = _sum_over_chunks(state_of_chunk, [*kf, values], chunk)
    return _readout_over_chunks(readout_of_chunk, state, qf, chunk)


def _hla_value_modulation_form(
    qf: list[Tensor], kf: list[Tensor], values: Tensor, chunk: int
) -> Tensor:
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
    """Hadamard linear attention: S = (Q₁K₁ᵀ) ⊙ … ⊙ (Q_pK_pᵀ), o = S v / (S 1 + eps).

    q_factors, k_factors: p tensors each (B, H, N, r_m), already feature-mapped;
    v: (B, H, N, d_v) -> (B, H, N, d_v). Equal to linear attention on row-wise
    Kronecker features of dimension R = ∏ r_m, computed in O(N·R·(d_v+1)) time with a
    state of size R·(d_v+1). ``form`` picks the "state" (Kronecker) form — the faster
    one in our benchmarks (docs/benchmarks.md) — or the "value_modulation" form.
    ``chunk_size`` (tokens per chunk) defaults to what keeps an N·R intermediate
    under ``CHUNK_ELEMENTS``.
    """
    if len(q_factors) != len(k_factors) or not q_factors:
        raise ValueError(
            f"hla_attention needs the same non-zero number of q and k factors, got "
            f"{len(q_factors)} and {len(k_factors)}"
        )
    for q_m, k_m in zip(q_factors, k_factors):
        _check_same_tokens("hla_attention", q_m, k_m, v)
        if q_m.shape[-1] != k_m.shape[-1]:
            raise ValueError(f"hla_attention: factor ranks differ: {q_m.shape} vs {k_m.shape}")
    if form not in HLA_FORMS:
        raise ValueError(f"hla_attention: unknown form {form!r}; valid forms: {HLA_FORMS}")

    batch, heads, num_tokens, d_v = v.shape
    rank = math.prod(q.shape[-1] for q in q_factors)
    width = d_v + 1 if normalize else d_v
    per_token = rank if form == "state" else max(rank, rank // q_factors[0].shape[-1] * width)
    chunk = _chunk_length(num_tokens, batch * heads * per_token, chunk_size)

    acc = _accumulation_dtype(v.dtype)
    with _no_autocast(v.device):
        qf = [q.to(acc) for q in q_factors]
        kf = [k.to(acc) for k in k_factors]
        values = _values_with_ones(v.to(acc), normalize)
        impl = _hla_state_form if form == "state" else _hla_value_modulation_form
        out = impl(qf, kf, values, chunk)
    return _finish(out, normalize, eps, v.dtype)


# ----------------------------------------------------------------------------- MHLA


def _check_blocks(block_index: Tensor, mixing: Tensor, num_tokens: int) -> int:
    if mixing.dim() != 2 or mixing.shape[0] != mixing.shape[1]:
        raise ValueError(f"mhla_attention: mixing must be (M, M), got {tuple(mixing.shape)}")
    num_blocks = mixing.shape[0]
    if block_index.shape != (num_tokens,) or block_index.dtype != torch.long:
        raise ValueError(
            f"mhla_attention: block_index must be a LongTensor of shape ({num_tokens},), got "
            f"{block_index.dtype} {tuple(block_index.shape)}"
        )
    if num_tokens and (int(block_index.min()) < 0 or int(block_index.max()) >= num_blocks):
        raise ValueError(f"mhla_attention: block_index values must lie in [0, {num_blocks})")
    return num_blocks


def _mhla_equal_blocks(q: Tensor, k: Tensor, values: Tensor, block_index: Tensor, mixing: Tensor) -> Tensor:
    """All blocks hold the same number of tokens: gather each block contiguously, batched GEMMs."""
    batch, heads, num_tokens, _ = q.shape
    num_blocks = mixing.shape[0]
    contiguous = bool((block_index[1:] >= block_index[:-1]).all())  # blocks already in order: no gather
    order = None if contiguous else torch.argsort(block_index, stable=True)

    def blocked(x: Tensor) -> Tensor:  # (B, H, N, c) -> (B, H, M, N/M, c)
        return (x if contiguous else x[:, :, order]).unflatten(2, (num_blocks, -1))

    summaries = blocked(k).transpose(-1, -2) @ blocked(values)  # (B, H, M, d, C)
    mixed = (mixing @ summaries.flatten(-2)).view_as(summaries)  # S̃_i = Σ_j m_ij S_j
    out = (blocked(q) @ mixed).flatten(2, 3)  # (B, H, N, C) in block order
    return out if contiguous else out[:, :, torch.argsort(order)]


def _mhla_ragged_blocks(
    q: Tensor, k: Tensor, values: Tensor, block_index: Tensor, mixing: Tensor, chunk: int
) -> Tensor:
    """Blocks of any sizes: scatter-add per-token outer products chunk by chunk."""
    batch, heads, num_tokens, d = q.shape
    width = values.shape[-1]
    num_blocks = mixing.shape[0]

    def summaries_of_chunk(index: Tensor, k_chunk: Tensor, v_chunk: Tensor) -> Tensor:
        outer = (k_chunk.unsqueeze(-1) * v_chunk.unsqueeze(-2)).flatten(-2)  # (B, H, n, d·C)
        zeros = outer.new_zeros(batch, heads, num_blocks, d * width)
        return zeros.index_add(2, index, outer)

    def readout_of_chunk(mixed: Tensor, index: Tensor, q_chunk: Tensor) -> Tensor:
        per_token = mixed[:, :, index]  # (B, H, n, d, C)
        return (q_chunk.unsqueeze(-2) @ per_token).squeeze(-2)

    summaries = _sum_over_chunks(summaries_of_chunk, [block_index, k, values], chunk)
    mixed = (mixing @ summaries).unflatten(-1, (d, width))  # (B, H, M, d, C)
    return _readout_over_chunks(readout_of_chunk, mixed, [block_index, q], chunk)


def mhla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_index: Tensor,
    mixing: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    chunk_size: int | None = None,
) -> Tensor:
    """Multi-head linear attention with token-level heads (blocks) and learned mixing.

    q, k: (B, H, N, d) non-negative features; v: (B, H, N, d_v); block_index: (N,) long
    in [0, M); mixing: (M, M), row i = weights of query block i over key blocks.
    Block summaries S_b = Σ_{s∈b} k_s [v_s, 1]ᵀ, mixed S̃_i = Σ_j m_ij S_j, and query t in
    block i reads o_t = q_tᵀ S̃_i (normalised with the ones column, paper Eq. 4).
    Equivalent to A[t, s] = m_{b(t), b(s)} q_t·k_s. Cost O(N·d·(d_v+1) + M²·d·(d_v+1)).
    Equal-sized blocks run as batched GEMMs; ragged blocks scatter-add in chunks of
    ``chunk_size`` tokens.
    """
    _check_same_tokens("mhla_attention", q, k, v)
    batch, heads, num_tokens, d = q.shape
    num_blocks = _check_blocks(block_index, mixing, num_tokens)
    block_index = block_index.to(q.device)

    acc = _accumulation_dtype(v.dtype)
    with _no_autocast(q.device):
        qa, ka, mix = q.to(acc), k.to(acc), mixing.to(acc)
        values = _values_with_ones(v.to(acc), normalize)
        counts = torch.bincount(block_index, minlength=num_blocks)
        if chunk_size is None and bool((counts == counts[0]).all()):
            out = _mhla_equal_blocks(qa, ka, values, block_index, mix)
        else:
            per_token = batch * heads * d * values.shape[-1]
            chunk = _chunk_length(num_tokens, per_token, chunk_size)
            out = _mhla_ragged_blocks(qa, ka, values, block_index, mix, chunk)
    return _finish(out, normalize, eps, v.dtype)
