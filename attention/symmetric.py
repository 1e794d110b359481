"""Symmetric tensor-power features: tied HLA with C(w + p − 1, p) instead of w^p features.

For p equal factors the Kronecker features x ⊗ … ⊗ x repeat every monomial
x_{a₁}⋯x_{a_p} once per ordering of its indices. Keeping only a₁ ≤ … ≤ a_p, weighted by
the multinomial coefficient mult(a) = p! / ∏ c_i! (c_i: how often variable i occurs),
gives exactly the same inner products:

    (x·y)^p = Σ_{a₁≤…≤a_p} mult(a) · x_{a₁}⋯x_{a_p} · y_{a₁}⋯y_{a_p}

with 153 instead of 289 features at p = 2, w = 17 (969 instead of 4,913 at p = 3).

The monomials are kept in lexicographic order, so that the degree-m monomials that start
with variable i are x_i times a contiguous suffix of the degree-(m−1) list: features are
built with w multiplies per degree, never a gather, and feature-major ((F, n) per head)
so that each of those pieces is one contiguous block. :class:`_TiedHLAState` runs the
whole two-pass state form on them with a hand-written backward that recomputes each
chunk's features from the factor (nothing of size N·R is stored, and no GEMM is
recomputed).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .compile_marks import assume_constant_result


@functools.cache
def symmetric_monomials(width: int, order: int) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """The monomials a₁ ≤ … ≤ a_p of ``order`` p over ``width`` w variables, and their multinomials.

    Returns (index tuples in lexicographic order, multinomial coefficients p! / ∏ c_i! with
    c_i the count of variable i); there are C(w + p − 1, p) of them.
    """
    index = tuple(itertools.combinations_with_replacement(range(width), order))
    multinomial = []
    for monomial in index:
        coefficient = math.factorial(order)
        for variable in set(monomial):
            coefficient //= math.factorial(monomial.count(variable))
        multinomial.append(coefficient)
    return index, tuple(multinomial)


@assume_constant_result
def symmetric_multinomials(width: int, order: int, device: torch.device | None = None) -> Tensor:
    """(F,) float64 multinomial coefficients of :func:`symmetric_monomials`, cached per device.

    Under ``torch.compile`` it runs at trace time; the result is a constant of the graph.
    """
    return _multinomial_tensor(width, order, device)


@functools.cache
def _multinomial_tensor(width: int, order: int, device: torch.device | None) -> Tensor:
    return torch.tensor(symmetric_monomials(width, order)[1], dtype=torch.float64, device=device)


def _segment_starts(width: int, degree: int) -> list[int]:
    """Offsets (length w + 1) of the degree-``degree`` monomials that start with variable i.

    The monomials starting with i are i followed by any degree − 1 monomial of variables
    i..w−1: C(w − i + degree − 2, degree − 1) of them.
    """
    starts = [0]
    for i in range(width):
        starts.append(starts[-1] + math.comb(width - i + degree - 2, degree - 1))
    return starts


def _monomial_powers(x: Tensor, order: int, differentiable: bool = False) -> list[Tensor]:
    """[degree 1, …, degree p] lexicographic monomials of x (..., w, n), feature-major, unweighted.

    Feature-major (features along dim −2, tokens last) so that every piece below is a
    contiguous block of rows: degree m is cat_i x_i · (degree m − 1)[starts[i]:]. In eager
    mode the pieces are written straight into the result (``out=``, no autograd) unless
    ``differentiable``; under ``torch.compile`` (which fuses the copies anyway) they are
    concatenated.
    """
    width = x.shape[-2]
    powers = [x]
    for degree in range(2, order + 1):
        previous, starts = powers[-1], _segment_starts(width, degree - 1)
        pieces = [(x[..., i : i + 1, :], previous[..., starts[i] :, :]) for i in range(width)]
        if differentiable or torch.compiler.is_compiling():
            powers.append(torch.cat([a * b for a, b in pieces], dim=-2))
            continue
        segments = _segment_starts(width, degree)
        out = x.new_empty(*x.shape[:-2], segments[-1], x.shape[-1])
        for i, (a, b) in enumerate(pieces):
            torch.mul(a, b, out=out[..., segments[i] : segments[i + 1], :])
        powers.append(out)
    return powers


def _monomial_backward(x: Tensor, powers: Sequence[Tensor], grad: Tensor) -> Tensor:
    """Gradient w.r.t. x (..., w, n) of ⟨grad, degree-p monomials⟩; ``powers`` from :func:`_monomial_powers`."""
    width = x.shape[-2]
    rows: list[Tensor | None] = [None] * width
    for degree in range(len(powers), 1, -1):
        previous = powers[degree - 2]
        segments, starts = _segment_starts(width, degree), _segment_starts(width, degree - 1)
        grad_previous = torch.zeros_like(previous)
        for i in range(width):
            piece = grad[..., segments[i] : segments[i + 1], :]  # monomials x_i · previous[starts[i]:]
            row = (piece * previous[..., starts[i] :, :]).sum(dim=-2)
            rows[i] = row if rows[i] is None else rows[i] + row
            grad_previous[..., starts[i] :, :].addcmul_(x[..., i : i + 1, :], piece)
        grad = grad_previous
    return grad if rows[0] is None else grad + torch.stack(rows, dim=-2)


def symmetric_power_features(x: Tensor, order: int) -> Tensor:
    """Symmetric tensor-power features: (..., n, w) -> (..., n, F), F = C(w + p − 1, p).

    f(x)_a = √(mult(a)) · x_{a₁}⋯x_{a_p} over the monomials a₁ ≤ … ≤ a_p (lexicographic
    order), so that f(x)·f(y) = (x·y)^p exactly. Differentiable (plain autograd).
    """
    multinomial = symmetric_multinomials(x.shape[-1], order, x.device)
    features = _monomial_powers(x.transpose(-1, -2), order, differentiable=True)[-1].transpose(-1, -2)
    return features * multinomial.to(x.dtype).sqrt()


class _TiedHLAState(torch.autograd.Function):
    """Two-pass state form of tied HLA on symmetric features, chunked over tokens.

    Inputs: q_factor, k_factor (B, H, N, w), values (B, H, N, C), multinomials (F,),
    order, chunk. Query features are the plain monomials, key features carry the full
    multinomial weight, so their inner product is (q·k)^p.
    Forward: T = Σ_chunks (mult ⊙ m(K_c))ᵀ V_c (B, H, F, C); O_c = m(Q_c) T.
    Backward recomputes m(·) per chunk: ∂T = Σ m(Q_c)ᵀ ∂O_c, ∂m(Q_c) = ∂O_c Tᵀ,
    ∂V_c = (mult ⊙ m(K_c)) ∂T, ∂m(K_c) = mult ⊙ (V_c ∂Tᵀ), then through m(·) by hand.
    """

    @staticmethod
    def forward(ctx, q_factor, k_factor, values, multinomial, order, chunk):
        weight = multinomial.unsqueeze(-1)  # (F, 1)
        state = None
        for k_chunk, v_chunk in zip(k_factor.split(chunk, dim=-2), values.split(chunk, dim=-2)):
            keys = _monomial_powers(k_chunk.transpose(-1, -2), order)[-1]  # (B, H, F, n)
            keys = keys * weight if order == 1 else keys.mul_(weight)  # degree 1 is the input itself
            part = keys @ v_chunk
            state = part if state is None else state + part
        out = [
            _monomial_powers(q_chunk.transpose(-1, -2), order)[-1].transpose(-1, -2) @ state
            for q_chunk in q_factor.split(chunk, dim=-2)
        ]
        ctx.save_for_backward(q_factor, k_factor, values, multinomial, state)
        ctx.order, ctx.chunk = order, chunk
        return torch.cat(out, dim=-2)

    @staticmethod
    def backward(ctx, grad_out):
        q_factor, k_factor, values, multinomial, state = ctx.saved_tensors
        order, chunk, weight = ctx.order, ctx.chunk, multinomial.unsqueeze(-1)
        grad_state, grad_q = None, []
        for q_chunk, g_chunk in zip(q_factor.split(chunk, dim=-2), grad_out.split(chunk, dim=-2)):
            q_t = q_chunk.transpose(-1, -2)
            powers = _monomial_powers(q_t, order)
            part = powers[-1] @ g_chunk
            grad_state = part if grad_state is None else grad_state + part
            if ctx.needs_input_grad[0]:
                grad_features = state @ g_chunk.transpose(-1, -2)  # (B, H, F, n)
                grad_q.append(_monomial_backward(q_t, powers, grad_features).transpose(-1, -2))
        grad_k, grad_v = [], []
        for k_chunk, v_chunk in zip(k_factor.split(chunk, dim=-2), values.split(chunk, dim=-2)):
            k_t = k_chunk.transpose(-1, -2)
            powers = _monomial_powers(k_t, order)
            if ctx.needs_input_grad[2]:
                grad_v.append((powers[-1] * weight).transpose(-1, -2) @ grad_state)
            if ctx.needs_input_grad[1]:
                grad_keys = (grad_state @ v_chunk.transpose(-1, -2)).mul_(weight)
                grad_k.append(_monomial_backward(k_t, powers, grad_keys).transpose(-1, -2))
        return (
            torch.cat(grad_q, dim=-2) if grad_q else None,
            torch.cat(grad_k, dim=-2) if grad_k else None,
            torch.cat(grad_v, dim=-2) if grad_v else None,
            None,
            None,
            None,
        )


def tied_state_form(q_factor: Tensor, k_factor: Tensor, values: Tensor, order: int, chunk: int) -> Tensor:
    """Σ_s (q_t·k_s)^p values_s for every query t, on symmetric features: (B, H, N, C).

    q_factor, k_factor (B, H, N, w) and values (B, H, N, C) share one dtype (the
    accumulation dtype); the token axis is processed in chunks of ``chunk`` tokens.
    """
    multinomial = symmetric_multinomials(q_factor.shape[-1], order, q_factor.device).to(values.dtype)
    return _TiedHLAState.apply(q_factor, k_factor, values, multinomial, order, chunk)
