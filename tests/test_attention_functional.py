"""Efficient attention cores against their quadratic oracles, and the identities between variants."""

import math

import pytest
import torch

from attention import (
    HLACore,
    guard_denominator,
    hla_attention,
    hla_tied_attention,
    linear_attention,
    mhla_attention,
    mhla_block_index,
    mhla_grid_attention,
    mhla_grid_plan,
    softmax_attention,
    symmetric_power_features,
)
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


def taylor_factors(q, k, order):
    """The HLA core's tied Taylor factors [1, x / √(p·√d)] (W = identity) of q and k.

    Tied cores exist for even p only; the odd-order factor is the order-2 core's factor of
    x·√(2/p), since [1, (x·√(2/p)) / √(2·√d)] = [1, x / √(p·√d)].
    """
    d = q.shape[-1]
    core = HLACore(d, 1, order=order if order % 2 == 0 else 2, rank=None).to(q.dtype)
    scale = 1.0 if order % 2 == 0 else math.sqrt(2 / order)
    return core.core_inputs(q * scale, k * scale, grid=(1, 1, q.shape[2]))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("form", ["symmetric", "state", "value_modulation"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hla_tied_taylor_matches_reference(order, form, dtype):
    q, k, v = normal(2, 2, 45, 6, dtype=dtype), normal(2, 2, 45, 6, dtype=dtype, seed=1), normal(2, 2, 45, 4, dtype=dtype, seed=2)
    q_factor, k_factor = taylor_factors(q, k, order)
    assert q_factor.shape == (2, 2, 45, 7)
    out = hla_tied_attention(q_factor, k_factor, v, order, form=form, chunk_size=11)
    assert_close(out, hla_attention_reference([q_factor] * order, [k_factor] * order, v), dtype)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("normalize", [True, False])
def test_hla_symmetric_features_equal_kronecker_in_float64(order, chunk_size, normalize):
    qf, kf = hla_inputs(2, 2, 37, (5,), torch.float64)
    v = normal(2, 2, 37, 3, seed=9)
    symmetric = hla_tied_attention(qf[0], kf[0], v, order, normalize=normalize, chunk_size=chunk_size)
    kronecker = hla_attention(qf * order, kf * order, v, normalize=normalize, chunk_size=chunk_size)
    oracle = hla_attention_reference(qf * order, kf * order, v, normalize=normalize)
    assert (symmetric - oracle).abs().max().item() <= 1e-10
    assert (symmetric - kronecker).abs().max().item() <= 1e-10


@pytest.mark.parametrize("width,order,count", [(17, 2, 153), (17, 3, 969), (5, 4, 70), (4, 1, 4)])
def test_symmetric_power_features_inner_products(width, order, count):
    x, y = normal(3, width), normal(3, width, seed=1)
    fx, fy = symmetric_power_features(x, order), symmetric_power_features(y, order)
    assert fx.shape == (3, count) == (3, math.comb(width + order - 1, order))
    assert ((fx * fy).sum(-1) - (x * y).sum(-1) ** order).abs().max().item() <= 1e-10


def grid_blocks(grid, layout):
    return mhla_block_index(grid, layout)


MHLA_CASES = [
    ((3, 4, 5), (1, 1, 1)),  # one block: plain linear attention
    ((2, 3, 3), (2, 3, 3)),  # one block per token
    ((4, 6, 6), (2, 3, 2)),  # a real 3D layout
    ((5, 7, 3), (2, 3, 2)),  # uneven blocks on every axis
    ((2, 2, 1), (3, 3, 2)),  # grid smaller than the layout: empty blocks
    ((1, 5, 4), (1, 2, 3)),  # T = 1, uneven spatial blocks
]
MHLA_PATHS = ["grid", "block_index"]  # grid plan (views or padded gather) / host plan from a block index


def run_mhla(path, q, k, v, grid, layout, mixing, **kwargs):
    if path == "grid":
        return mhla_grid_attention(q, k, v, grid, layout, mixing, **kwargs)
    return mhla_attention(q, k, v, grid_blocks(grid, layout), mixing, **kwargs)


@pytest.mark.parametrize("grid,layout", MHLA_CASES)
@pytest.mark.parametrize("path", MHLA_PATHS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mhla_matches_reference(grid, layout, path, normalize, dtype):
    N, M = math.prod(grid), math.prod(layout)
    q, k = positive(2, 3, N, 5, dtype=dtype), positive(2, 3, N, 5, dtype=dtype, seed=1)
    v = normal(2, 3, N, 4, dtype=dtype, seed=2)
    mixing = positive(M, M, dtype=torch.float32, seed=3)
    out = run_mhla(path, q, k, v, grid, layout, mixing, normalize=normalize)
    assert out.shape == (2, 3, N, 4)
    block_index = grid_blocks(grid, layout)
    assert_close(out, mhla_attention_reference(q, k, v, block_index, mixing, normalize=normalize), dtype)


@pytest.mark.parametrize("grid,layout", MHLA_CASES)
@pytest.mark.parametrize("path", MHLA_PATHS)
def test_mhla_separate_normalizer_matches_reference(grid, layout, path):
    N, M = math.prod(grid), math.prod(layout)
    q, k, nq, nk = (positive(1, 2, N, 4, seed=s) for s in range(4))
    v, mixing = normal(1, 2, N, 3, seed=5), positive(M, M, seed=6)
    out = run_mhla(path, q, k, v, grid, layout, mixing, normalizer_q=nq, normalizer_k=nk)
    expected = mhla_attention_reference(q, k, v, grid_blocks(grid, layout), mixing, normalizer_q=nq, normalizer_k=nk)
    assert_close(out, expected, torch.float64)


def test_mhla_block_index_and_plans_of_uneven_grids():
    # token (t, h, w) lies in block (t·Mt // T, h·Mh // H, w·Mw // W)
    grid, layout = (5, 7, 3), (2, 3, 2)
    index = mhla_block_index(grid, layout).view(grid)
    for t, h, w in [(0, 0, 0), (2, 3, 1), (4, 6, 2), (3, 2, 0)]:
        bt, bh, bw = t * 2 // 5, h * 3 // 7, w * 2 // 3
        assert index[t, h, w] == (bt * 3 + bh) * 2 + bw
    assert torch.bincount(index.reshape(-1), minlength=12).min() > 0
    # dividing layouts: plain windows, no gather; a grid smaller than the layout leaves empty blocks
    assert mhla_grid_plan((4, 6, 6), (2, 3, 2)).windows == ((4, 6, 6), (2, 3, 2))
    plan = mhla_grid_plan((2, 2, 1), (3, 3, 2))
    assert plan.windows is None and plan.num_blocks == 18 and plan.block_size == 1
    assert int(plan.filled.sum()) == 4
    assert torch.equal(plan.gather[plan.scatter], torch.arange(4))


@pytest.mark.parametrize("normalize", [True, False])
def test_mhla_ragged_blocks_match_reference(normalize):
    N, M = 53, 6
    q, k, v = positive(1, 2, N, 4), positive(1, 2, N, 4, seed=1), normal(1, 2, N, 3, seed=2)
    block_index = torch.randint(0, M - 1, (N,), generator=torch.Generator().manual_seed(0))  # block M-1 empty
    mixing = positive(M, M, seed=3)
    out = mhla_attention(q, k, v, block_index, mixing, normalize=normalize)
    assert_close(out, mhla_attention_reference(q, k, v, block_index, mixing, normalize=normalize), torch.float64)


def test_mhla_bad_block_index_is_refused():
    q = positive(1, 1, 6, 2)
    with pytest.raises(ValueError, match=r"block_index values must lie in \[0, 2\)"):
        mhla_attention(q, q, q, torch.tensor([0, 1, 2, 0, 1, 1]), torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="block_index must have shape"):
        mhla_attention(q, q, q, torch.zeros(5, dtype=torch.long), torch.ones(2, 2, dtype=torch.float64))


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
        q_factor, k_factor = taylor_factors(q, k, order)
        errors.append((hla_tied_attention(q_factor, k_factor, v, order, eps=0.0) - exact).abs().max().item())
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


@pytest.mark.parametrize("grid,layout", [((1, 2, 3), (1, 2, 1)), ((1, 3, 2), (1, 2, 3))])  # windows / padded gather
@pytest.mark.parametrize("normalize", [True, False])
def test_mhla_gradcheck(grid, layout, normalize):
    N, M = math.prod(grid), math.prod(layout)
    q, k = positive(1, 2, N, 3).requires_grad_(), positive(1, 2, N, 3, seed=1).requires_grad_()
    v = normal(1, 2, N, 2, seed=2).requires_grad_()
    mixing = positive(M, M, seed=3).requires_grad_()

    def fn(q_, k_, v_, m_):
        return mhla_grid_attention(q_, k_, v_, grid, layout, m_, normalize=normalize)

    assert torch.autograd.gradcheck(fn, (q, k, v, mixing))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("normalize", [True, False])
def test_hla_symmetric_gradcheck(order, normalize):
    """The symmetric form's hand-written backward, chunked (2 tokens per chunk)."""
    q, k = positive(1, 2, 5, 3).requires_grad_(), positive(1, 2, 5, 3, seed=1).requires_grad_()
    v = normal(1, 2, 5, 2, seed=2).requires_grad_()

    def fn(a, b, c):
        return hla_tied_attention(a, b, c, order, normalize=normalize, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    # only some inputs needing gradients
    assert torch.autograd.gradcheck(lambda b: fn(q.detach(), b, v.detach()), (k,))
    assert torch.autograd.gradcheck(lambda c: fn(q.detach(), k.detach(), c), (v,))


def test_symmetric_power_features_gradcheck():
    x = normal(2, 3, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: symmetric_power_features(t, 3), (x,))


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


# ----------------------------------------------------------------------------- denominator guard


def signed_cores(block_index, mixing):
    return {
        "linear": lambda q, k, v: linear_attention(q, k, v),
        "hla": lambda q, k, v: hla_attention([q], [k], v),
        "hla_tied": lambda q, k, v: hla_tied_attention(q, k, v, 2),
        "mhla": lambda q, k, v: mhla_attention(q, k, v, block_index, mixing),
    }


def signed_oracles(block_index, mixing):
    return {
        "linear": lambda q, k, v: linear_attention_reference(q, k, v),
        "hla": lambda q, k, v: hla_attention_reference([q], [k], v),
        "hla_tied": lambda q, k, v: hla_attention_reference([q, q], [k, k], v),
        "mhla": lambda q, k, v: mhla_attention_reference(q, k, v, block_index, mixing),
    }


def test_guard_keeps_the_sign_and_a_magnitude_of_at_least_eps():
    den = torch.tensor([-1.0, -1e-6, -1e-30, -0.0, 0.0, 1e-30, 1e-6, 2.0])
    guarded = guard_denominator(den, 1e-6)
    assert (guarded.abs() >= 1e-6).all()
    assert torch.equal(guarded[den > 0], den[den > 0] + 1e-6)  # the spec's Σ A + eps where Σ A > 0
    assert (guarded[:3] < 0).all() and (guarded[3:] > 0).all()


def test_row_sum_of_minus_eps_stays_finite():
    # one token whose row sum is exactly −eps: "Σ A + eps" would divide by zero
    q = torch.ones(1, 1, 1, 1)
    k = torch.full((1, 1, 1, 1), -1e-6)
    v = torch.ones(1, 1, 1, 1)
    mixing = torch.ones(1, 1)
    for name, run in signed_cores(torch.zeros(1, dtype=torch.long), mixing).items():
        if name == "hla_tied":
            continue  # a tied square cannot be negative
        out = run(q, k, v)
        assert torch.isfinite(out).all(), name
        assert abs(out.item() - 0.5) < 1e-6, name  # −1e-6 / (−1e-6 − 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_adversarial_row_sums_stay_finite_and_match_the_guarded_oracle(dtype):
    """Keys clustered around one direction, queries opposite: row sums ≈ 0 of either sign."""
    gen = torch.Generator().manual_seed(0)
    N, d = 96, 8
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    direction /= direction.norm()
    k = direction + 1e-3 * torch.randn(1, 2, N, d, generator=gen, dtype=torch.float64)
    q = (-direction * torch.linspace(0.5, 2.0, N, dtype=torch.float64).view(1, 1, N, 1)).expand(1, 2, N, d)
    # balanced signed features: half the keys flipped, so linear row sums cancel to ≈ 0
    k = torch.cat([k[:, :, : N // 2], -k[:, :, N // 2 :] * (1 + 1e-7)], dim=2)
    k[:, 1] = 0.0  # and a head whose keys are all zero: row sums exactly 0
    v = torch.randn(1, 2, N, 4, generator=gen, dtype=torch.float64)
    block_index = torch.arange(N) % 3
    mixing = torch.rand(3, 3, generator=gen, dtype=torch.float64)
    q_in, k_in, v_in = q.to(dtype), k.to(dtype), v.to(dtype)
    oracles = signed_oracles(block_index, mixing)
    for name, run in signed_cores(block_index, mixing).items():
        out = run(q_in, k_in, v_in)
        assert out.dtype == dtype and torch.isfinite(out).all(), (name, dtype)
        if dtype == torch.float64:
            expected = oracles[name](q_in, k_in, v_in)
            assert (out - expected).abs().max().item() <= 1e-10 * max(1.0, expected.abs().max().item()), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tied_taylor_hla_with_opposite_queries_stays_finite(dtype):
    """(1 + s/2)² ≈ 0 for every key: row sums are ≈ 0 and only rounding decides their sign."""
    gen = torch.Generator().manual_seed(1)
    N, d = 200, 16
    direction = torch.randn(d, generator=gen)
    direction = direction / direction.norm() * math.sqrt(2 * math.sqrt(d))  # s = q·k/√d ≈ −2
    k = direction + 1e-3 * torch.randn(1, 1, N, d, generator=gen)
    q = -direction.expand(1, 1, N, d)
    q_factor, k_factor = taylor_factors(q.to(dtype), k.to(dtype), 2)
    v = torch.randn(1, 1, N, 4, generator=gen).to(dtype)
    for form in ("symmetric", "state", "value_modulation"):
        out = hla_tied_attention(q_factor, k_factor, v, 2, form=form)
        assert out.dtype == dtype and torch.isfinite(out).all(), form
