"""Efficient attention cores against their quadratic oracles, and the identities between variants."""

import math

import pytest
import torch

from attention import hla_attention, linear_attention, mhla_attention, softmax_attention
from attention.layers import mhla_block_index
from attention.reference import (
    hla_attention_reference,
    linear_attention_reference,
    mhla_attention_reference,
    softmax_attention_reference,
)

SHAPES = [(1, 1, 1, 4, 3), (2, 3, 37, 8, 5), (1, 2, 130, 6, 6)]  # (B, H, N, d, d_v)


def positive(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=gen, dtype=torch.float64).to(dtype) + 0.05


def normal(*shape, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def assert_close(actual, expected, dtype):
    assert actual.dtype == expected.dtype
    if dtype == torch.float64:
        assert (actual - expected).abs().max().item() <= 1e-10
    else:
        scale = expected.double().abs().max().item()
        assert (actual.double() - expected.double()).abs().max().item() <= 1e-4 * max(scale, 1e-6)


def hla_inputs(B, H, N, ranks, dtype, seed=0):
    qf = [positive(B, H, N, r, dtype=dtype, seed=seed + 2 * i) for i, r in enumerate(ranks)]
    kf = [positive(B, H, N, r, dtype=dtype, seed=seed + 2 * i + 1) for i, r in enumerate(ranks)]
    return qf, kf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,N,d,dv", SHAPES)
def test_softmax_matches_reference(dtype, B, H, N, d, dv):
    q, k, v = normal(B, H, N, d, dtype=dtype), normal(B, H, N, d, dtype=dtype, seed=1), normal(B, H, N, dv, dtype=dtype, seed=2)
    assert_close(softmax_attention(q, k, v), softmax_attention_reference(q, k, v), dtype)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,N,d,dv", SHAPES)
def test_linear_matches_reference(normalize, dtype, B, H, N, d, dv):
    q, k = positive(B, H, N, d, dtype=dtype), positive(B, H, N, d, dtype=dtype, seed=1)
    v = normal(B, H, N, dv, dtype=dtype, seed=2)
    out = linear_attention(q, k, v, normalize=normalize)
    assert out.shape == (B, H, N, dv)
    assert_close(out, linear_attention_reference(q, k, v, normalize=normalize), dtype)


@pytest.mark.parametrize("form", ["state", "value_modulation"])
@pytest.mark.parametrize("ranks", [(5,), (3, 4), (3, 2, 4)])
@pytest.mark.parametrize("chunk_size", [None, 7])  # 7 divides none of the token counts
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,H,N,d,dv", SHAPES)
def test_hla_untied_matches_reference(form, ranks, chunk_size, normalize, dtype, B, H, N, d, dv):
    qf, kf = hla_inputs(B, H, N, ranks, dtype)
    v = normal(B, H, N, dv, dtype=dtype, seed=9)
    out = hla_attention(qf, kf, v, normalize=normalize, form=form, chunk_size=chunk_size)
    assert out.shape == (B, H, N, dv)
    assert_close(out, hla_attention_reference(qf, kf, v, normalize=normalize), dtype)


def taylor_factor(x, order):
    """Tied Taylor factor [1, x / √(p·√d)] as the HLA layer builds it."""
    d = x.shape[-1]
    return torch.cat([torch.ones_like(x[..., :1]), x / math.sqrt(order * math.sqrt(d))], dim=-1)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("form", ["state", "value_modulation"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hla_tied_taylor_matches_reference(order, form, dtype):
    q, k, v = normal(2, 2, 45, 6, dtype=dtype), normal(2, 2, 45, 6, dtype=dtype, seed=1), normal(2, 2, 45, 4, dtype=dtype, seed=2)
    qf, kf = [taylor_factor(q, order)] * order, [taylor_factor(k, order)] * order
    out = hla_attention(qf, kf, v, form=form, chunk_size=11)
    assert_close(out, hla_attention_reference(qf, kf, v), dtype)


def grid_blocks(grid, layout):
    return mhla_block_index(grid, layout)


MHLA_CASES = [
    ((3, 4, 5), (1, 1, 1)),  # one block: plain linear attention
    ((2, 3, 3), (2, 3, 3)),  # one block per token
    ((4, 6, 6), (2, 3, 2)),  # a real 3D layout
]


@pytest.mark.parametrize("grid,layout", MHLA_CASES)
@pytest.mark.parametrize("chunk_size", [None, 7])  # None: batched equal blocks; 7: ragged scatter path
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mhla_matches_reference(grid, layout, chunk_size, normalize, dtype):
    N, M = math.prod(grid), math.prod(layout)
    q, k = positive(2, 3, N, 5, dtype=dtype), positive(2, 3, N, 5, dtype=dtype, seed=1)
    v = normal(2, 3, N, 4, dtype=dtype, seed=2)
    mixing = positive(M, M, dtype=torch.float32, seed=3)
    block_index = grid_blocks(grid, layout)
    out = mhla_attention(q, k, v, block_index, mixing, normalize=normalize, chunk_size=chunk_size)
    assert out.shape == (2, 3, N, 4)
    assert_close(out, mhla_attention_reference(q, k, v, block_index, mixing, normalize=normalize), dtype)


def test_mhla_ragged_blocks_match_reference():
    N, M = 53, 6
    q, k, v = positive(1, 2, N, 4), positive(1, 2, N, 4, seed=1), normal(1, 2, N, 3, seed=2)
    block_index = torch.randint(0, M - 1, (N,), generator=torch.Generator().manual_seed(0))  # block M-1 empty
    mixing = positive(M, M, seed=3)
    out = mhla_attention(q, k, v, block_index, mixing)
    assert_close(out, mhla_attention_reference(q, k, v, block_index, mixing), torch.float64)


# ----------------------------------------------------------------------------- identities


def test_hla_order_one_is_linear_attention():
    q, k, v = positive(2, 2, 33, 5), positive(2, 2, 33, 5, seed=1), normal(2, 2, 33, 4, seed=2)
    for normalize in (True, False):
        hla = hla_attention([q], [k], v, normalize=normalize)
        lin = linear_attention(q, k, v, normalize=normalize)
        assert (hla - lin).abs().max().item() <= 1e-12


def test_mhla_all_ones_mixing_is_linear_attention():
    grid, layout = (4, 6, 6), (2, 3, 2)
    N, M = math.prod(grid), math.prod(layout)
    q, k, v = positive(1, 2, N, 5), positive(1, 2, N, 5, seed=1), normal(1, 2, N, 3, seed=2)
    out = mhla_attention(q, k, v, grid_blocks(grid, layout), torch.ones(M, M, dtype=torch.float64))
    assert (out - linear_attention(q, k, v)).abs().max().item() <= 1e-12


def test_mhla_identity_mixing_is_block_local():
    grid, layout = (2, 4, 4), (1, 2, 2)
    N, M = math.prod(grid), math.prod(layout)
    q, k, v = positive(1, 1, N, 5), positive(1, 1, N, 5, seed=1), normal(1, 1, N, 3, seed=2)
    block_index = grid_blocks(grid, layout)
    out = mhla_attention(q, k, v, block_index, torch.eye(M, dtype=torch.float64))
    for b in range(M):
        members = (block_index == b).nonzero().squeeze(1)
        local = linear_attention(q[:, :, members], k[:, :, members], v[:, :, members])
        assert (out[:, :, members] - local).abs().max().item() <= 1e-12
    # Changing values in one block leaves every other block's output untouched.
    v2 = v.clone()
    v2[:, :, block_index == 0] += 10.0
    out2 = mhla_attention(q, k, v2, block_index, torch.eye(M, dtype=torch.float64))
    assert torch.equal(out2[:, :, block_index != 0], out[:, :, block_index != 0])


def test_tied_taylor_hla_approaches_softmax_as_order_grows():
    gen = torch.Generator().manual_seed(0)
    d = 16
    q = torch.randn(1, 2, 64, d, generator=gen, dtype=torch.float64) * 0.6  # moderate logits, |s| ≲ 2
    k = torch.randn(1, 2, 64, d, generator=gen, dtype=torch.float64) * 0.6
    v = torch.randn(1, 2, 64, 8, generator=gen, dtype=torch.float64)
    exact = softmax_attention(q, k, v)
    errors = []
    for order in (1, 2, 3, 4):
        qf, kf = [taylor_factor(q, order)] * order, [taylor_factor(k, order)] * order
        errors.append((hla_attention(qf, kf, v, eps=0.0) - exact).abs().max().item())
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


# ----------------------------------------------------------------------------- gradients


def test_hla_gradcheck_both_forms():
    for form in ("state", "value_modulation"):
        qf = [positive(1, 2, 5, r, seed=i).requires_grad_() for i, r in enumerate((2, 3))]
        kf = [positive(1, 2, 5, r, seed=5 + i).requires_grad_() for i, r in enumerate((2, 3))]
        v = normal(1, 2, 5, 2, seed=9).requires_grad_()

        def fn(q1, q2, k1, k2, v_):
            return hla_attention([q1, q2], [k1, k2], v_, form=form, chunk_size=2)

        assert torch.autograd.gradcheck(fn, (*qf, *kf, v))


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_mhla_gradcheck(chunk_size):
    block_index = grid_blocks((1, 2, 3), (1, 2, 1))
    q, k = positive(1, 2, 6, 3).requires_grad_(), positive(1, 2, 6, 3, seed=1).requires_grad_()
    v = normal(1, 2, 6, 2, seed=2).requires_grad_()
    mixing = positive(2, 2, seed=3).requires_grad_()

    def fn(q_, k_, v_, m_):
        return mhla_attention(q_, k_, v_, block_index, m_, chunk_size=chunk_size)

    assert torch.autograd.gradcheck(fn, (q, k, v, mixing))


def test_linear_gradcheck():
    q, k = positive(1, 1, 6, 3).requires_grad_(), positive(1, 1, 6, 3, seed=1).requires_grad_()
    v = normal(1, 1, 6, 2, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: linear_attention(a, b, c), (q, k, v))


# ----------------------------------------------------------------------------- low precision


def low_precision_cases():
    gen = torch.Generator().manual_seed(0)
    N, d = 257, 16
    base = torch.randn(1, 2, N, d, generator=gen)
    yield "normal", torch.relu(base) + 1e-6, torch.relu(torch.randn(1, 2, N, d, generator=gen)) + 1e-6
    yield "huge norms", torch.relu(base) * 1e3 + 1e-6, torch.relu(base.flip(2)) * 1e3 + 1e-6
    yield "all-zero features", torch.zeros(1, 2, N, d), torch.zeros(1, 2, N, d)
    yield "one token", torch.relu(base[:, :, :1]) + 1e-6, torch.relu(base[:, :, 1:2]) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_stay_finite_and_close(dtype):
    for case, q, k in low_precision_cases():
        N = q.shape[2]
        v = torch.randn(1, 2, N, 8, generator=torch.Generator().manual_seed(1))
        q_lo, k_lo, v_lo = q.to(dtype), k.to(dtype), v.to(dtype)
        block_index = torch.arange(N) % 2  # two interleaved blocks
        mixing = torch.tensor([[1.0, 0.5], [0.25, 1.0]])
        runs = {
            "linear": lambda a, b, c: linear_attention(a, b, c),
            "hla": lambda a, b, c: hla_attention([a, a], [b, b], c),
            "mhla": lambda a, b, c: mhla_attention(a, b, c, block_index, mixing),
        }
        for name, run in runs.items():
            low = run(q_lo, k_lo, v_lo)
            high = run(q_lo.float(), k_lo.float(), v_lo.float())  # same rounded inputs, fp32 math
            assert low.dtype == dtype, (case, name)
            assert torch.isfinite(low).all(), (case, name)
            tol = 2e-2 * max(high.abs().max().item(), 1.0)
            assert (low.float() - high).abs().max().item() <= tol, (case, name)


def test_bf16_under_autocast_accumulates_in_fp32():
    # A long sequence of equal contributions: a bf16 running sum would stall far below the total.
    N = 20000
    q = torch.ones(1, 1, N, 1, dtype=torch.bfloat16)
    k = torch.ones(1, 1, N, 1, dtype=torch.bfloat16)
    v = torch.ones(1, 1, N, 1, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(q, k, v, normalize=False)
    assert out.dtype == torch.bfloat16
    assert abs(out[0, 0, 0, 0].item() - N) / N < 1e-2
