"""MHLA's token blocks: layouts, block plans and the efficient core.

Tokens of a (T, H, W) grid (t-major, n = (t·H + h)·W + w) are split into
M = Mt·Mh·Mw 3D blocks. Token (t, h, w) belongs to block (t·Mt // T, h·Mh // H, w·Mw // W),
flattened b = (bt·Mh + bh)·Mw + bw. When the layout divides the grid these are equal
windows; otherwise blocks are uneven, and a grid smaller than the layout along an axis
leaves some blocks empty. Everything about blocks is derived from python ints
(grid, layout) and cached in a :class:`BlockPlan`:

- equal windows: a view/permute of the (T, H, W) axes into (Mt, Mh, Mw, t, h, w); its
  backward is a permute copy;
- uneven blocks (or an arbitrary ``block_index``): a gather into M blocks padded to the
  largest block size L, with empty slots masked out of the key summaries, and a gather back.

Both then run the same batched GEMMs: block summaries S_b = K_bᵀ V_b, mixing
S̃_i = Σ_j m_ij S_j, read-out Q_b S̃_b. No tensor value is read on the host in
:func:`mhla_grid_attention` (the layers' path), so it traces into one graph.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from .compile_marks import assume_constant_result
from .functional import (
    accumulation_dtype,
    check_same_tokens,
    guard_denominator,
    no_autocast,
    normalizer_features,
)

Grid = tuple[int, int, int]


# ----------------------------------------------------------------------------- layouts


def check_grid(grid, setting: str = "grid") -> Grid:
    """Three positive python ints (T, H, W), else a ValueError naming ``setting``."""
    if isinstance(grid, str) or not isinstance(grid, (tuple, list)) or len(grid) != 3:
        raise ValueError(f"{setting} must be three positive integers (T, H, W), got {grid!r}")
    values = (int(grid[0]), int(grid[1]), int(grid[2]))
    if min(values) < 1 or list(values) != list(grid):
        raise ValueError(f"{setting} must be three positive integers (T, H, W), got {grid!r}")
    return values


def mhla_valid_layouts(grid: Grid) -> list[Grid]:
    """All block layouts (Mt, Mh, Mw) whose counts divide the grid (T, H, W)."""
    divisors = [[m for m in range(1, g + 1) if g % m == 0] for g in grid]
    return [tuple(layout) for layout in itertools.product(*divisors)]


def mhla_auto_layout(grid: Grid) -> Grid:
    """The dividing layout with the most blocks M such that M² ≤ N.

    Ties go to the layout whose blocks are closest to cubes (smallest ratio of longest
    to shortest block side), then to the one with more spatial blocks (Mh·Mw), then Mh.
    """
    grid = check_grid(tuple(grid), "mhla_auto_layout: grid")
    num_tokens = math.prod(grid)
    candidates = [lay for lay in mhla_valid_layouts(grid) if math.prod(lay) ** 2 <= num_tokens]

    def preference(layout: Grid):
        sides = [g // m for g, m in zip(grid, layout)]
        return (math.prod(layout), -max(sides) / min(sides), layout[1] * layout[2], layout[1])

    return max(candidates, key=preference)


@functools.cache
def _axis_segments(size: int, blocks: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Along one axis of ``size`` tokens cut into ``blocks``: (start, length) of every block.

    Coordinate x lies in block x·blocks // size, so block b starts at ⌈b·size / blocks⌉.
    """
    starts = tuple(-(-b * size // blocks) for b in range(blocks + 1))
    return starts[:-1], tuple(end - start for start, end in itertools.pairwise(starts))


def mhla_block_index(grid: Grid, layout: Grid) -> Tensor:
    """(N,) long: block of each token, b = (bt·Mh + bh)·Mw + bw with bt = t·Mt // T etc."""
    axes = [torch.arange(g) * m // g for g, m in zip(grid, layout)]
    index = (axes[0][:, None, None] * layout[1] + axes[1][None, :, None]) * layout[2] + axes[2][None, None, :]
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


# ----------------------------------------------------------------------------- block plans


class BlockPlan(NamedTuple):
    """How to arrange N tokens as M blocks of L (padded) slots and back.

    windows: ((T, H, W), (Mt, Mh, Mw)) when the blocks are equal 3D windows (view/permute,
        no other field needed), else None.
    gather: (M·L,) long, the token in each slot, block-major (any token for an empty slot).
    scatter: (N,) long, the slot of each token.
    filled: (M·L, 1) bool, False for empty slots; None when every slot holds a token.
    """

    num_blocks: int
    block_size: int
    windows: tuple[Grid, Grid] | None = None
    gather: Tensor | None = None
    scatter: Tensor | None = None
    filled: Tensor | None = None


@assume_constant_result
def mhla_grid_plan(grid: Grid, layout: Grid, device: torch.device | None = None) -> BlockPlan:
    """The :class:`BlockPlan` of a grid and layout, built from python ints only.

    Cached per (grid, layout, device); under ``torch.compile`` it runs at trace time and its
    tensors are constants of the graph (Dynamo guards on the python ints).
    """
    return _grid_plan(tuple(grid), tuple(layout), device)


def _axis_slots(size: int, blocks: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """One axis padded to ``blocks`` segments of the longest segment length L.

    Returns (slot of each coordinate (size,), coordinate of each slot (blocks, L) — 0 for
    an empty slot —, whether each slot holds a coordinate (blocks, L), L).
    """
    starts, sizes = _axis_segments(size, blocks)
    longest = max(sizes)
    block = [x * blocks // size for x in range(size)]
    slot = torch.tensor([b * longest + x - starts[b] for x, b in enumerate(block)])
    offsets = torch.arange(longest)[None, :]
    filled = offsets < torch.tensor(sizes)[:, None]
    coordinate = torch.where(filled, torch.tensor(starts)[:, None] + offsets, 0)
    return slot, coordinate, filled, longest


@functools.cache
def _grid_plan(grid: Grid, layout: Grid, device: torch.device | None) -> BlockPlan:
    grid, layout = check_grid(grid), check_grid(layout, "MHLA layout")
    num_blocks = math.prod(layout)
    if all(g % m == 0 for g, m in zip(grid, layout)):
        return BlockPlan(num_blocks, math.prod(grid) // num_blocks, windows=(grid, layout))
    (st, ct, ft, lt), (sh, ch, fh, lh), (sw, cw, fw, lw) = [_axis_slots(g, m) for g, m in zip(grid, layout)]
    mt, mh, mw = layout
    block_size = lt * lh * lw
    # scatter: slot of token (t, h, w) = block(t, h, w)·L + offset(t, h, w)
    block = ((st // lt)[:, None, None] * mh + (sh // lh)[None, :, None]) * mw + (sw // lw)[None, None, :]
    offset = ((st % lt)[:, None, None] * lh + (sh % lh)[None, :, None]) * lw + (sw % lw)[None, None, :]
    scatter = (block * block_size + offset).reshape(-1)
    # gather: token of slot (bt, bh, bw, jt, jh, jw), block-major
    shapes = [(mt, 1, 1, lt, 1, 1), (1, mh, 1, 1, lh, 1), (1, 1, mw, 1, 1, lw)]
    ct, ch, cw = [c.view(shape) for c, shape in zip((ct, ch, cw), shapes)]
    ft, fh, fw = [f.view(shape) for f, shape in zip((ft, fh, fw), shapes)]
    gather = ((ct * grid[1] + ch) * grid[2] + cw).reshape(-1)
    complete = math.prod(grid) == num_blocks * block_size
    return BlockPlan(
        num_blocks,
        block_size,
        gather=gather.to(device),
        scatter=scatter.to(device),
        filled=None if complete else (ft & fh & fw).reshape(-1, 1).to(device),
    )


def mhla_index_plan(block_index: Tensor, num_blocks: int) -> BlockPlan:
    """The :class:`BlockPlan` of an arbitrary block index (N,) long in [0, M), built on the host.

    Validates the index. Sorted equal blocks become a plain view; anything else is
    gathered into blocks padded to the largest block (stable order within a block).
    """
    num_tokens = block_index.shape[0] if block_index.dim() == 1 else -1
    if block_index.dim() != 1 or block_index.dtype != torch.long:
        raise ValueError(
            f"mhla_attention: block_index must be a 1-D LongTensor, got {block_index.dtype} {tuple(block_index.shape)}"
        )
    if num_tokens and (int(block_index.min()) < 0 or int(block_index.max()) >= num_blocks):
        raise ValueError(f"mhla_attention: block_index values must lie in [0, {num_blocks})")
    device = block_index.device
    index = block_index.cpu()
    counts = torch.bincount(index, minlength=num_blocks)
    block_size = max(1, int(counts.max())) if num_tokens else 1
    if num_tokens == num_blocks * block_size and bool((index[1:] >= index[:-1]).all()):
        return BlockPlan(num_blocks, block_size, windows=((1, 1, num_tokens), (1, 1, num_blocks)))
    order = torch.argsort(index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_blocks = index[order]
    slots = sorted_blocks * block_size + torch.arange(num_tokens) - starts[sorted_blocks]
    scatter = torch.empty(num_tokens, dtype=torch.long)
    scatter[order] = slots
    gather = torch.zeros(num_blocks * block_size, dtype=torch.long)
    gather[slots] = order
    filled = torch.zeros(num_blocks * block_size, 1, dtype=torch.bool)
    filled[slots] = True
    complete = num_tokens == num_blocks * block_size
    return BlockPlan(
        num_blocks,
        block_size,
        gather=gather.to(device),
        scatter=scatter.to(device),
        filled=None if complete else filled.to(device),
    )


def _to_blocks(x: Tensor, plan: BlockPlan) -> Tensor:
    """(B, H, N, c) -> (B, H, M, L, c) following the plan (empty slots hold arbitrary tokens)."""
    batch, heads, _, width = x.shape
    if plan.windows is not None:
        (gt, gh, gw), (mt, mh, mw) = plan.windows
        x = x.reshape(batch, heads, mt, gt // mt, mh, gh // mh, mw, gw // mw, width)
        x = x.permute(0, 1, 2, 4, 6, 3, 5, 7, 8)
    else:
        x = x.index_select(2, plan.gather)
    return x.reshape(batch, heads, plan.num_blocks, plan.block_size, width)


def _from_blocks(x: Tensor, plan: BlockPlan) -> Tensor:
    """(B, H, M, L, c) -> (B, H, N, c), the inverse of :func:`_to_blocks` on filled slots."""
    batch, heads, _, _, width = x.shape
    if plan.windows is not None:
        (gt, gh, gw), (mt, mh, mw) = plan.windows
        x = x.reshape(batch, heads, mt, mh, mw, gt // mt, gh // mh, gw // mw, width)
        return x.permute(0, 1, 2, 5, 3, 6, 4, 7, 8).reshape(batch, heads, gt * gh * gw, width)
    return x.flatten(2, 3).index_select(2, plan.scatter)


def _masked_keys(x: Tensor, plan: BlockPlan) -> Tensor:
    """Key blocks with empty slots zeroed, so that they add nothing to the summaries."""
    blocks = _to_blocks(x, plan)
    if plan.filled is None:
        return blocks
    return blocks * plan.filled.view(plan.num_blocks, plan.block_size, 1).to(blocks.dtype)


def _mix(mixing: Tensor, summaries: Tensor) -> Tensor:
    """S̃_i = Σ_j m_ij S_j over the block axis 2 of (B, H, M, ...)."""
    return (mixing @ summaries.flatten(3)).view_as(summaries)


def _mhla_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mixing: Tensor,
    plan: BlockPlan,
    normalize: bool,
    eps: float,
    normalizer_q: Tensor | None,
    normalizer_k: Tensor | None,
) -> Tensor:
    """The shared MHLA computation on (B, H, N, ·) inputs; returns (B, H, N, d_v) in v's dtype."""
    separate = normalizer_q is not None
    nq, nk = normalizer_features(q, k, normalizer_q, normalizer_k)
    if mixing.dim() != 2 or mixing.shape != (plan.num_blocks, plan.num_blocks):
        raise ValueError(
            f"mhla_attention: mixing must be ({plan.num_blocks}, {plan.num_blocks}) for {plan.num_blocks} blocks, "
            f"got {tuple(mixing.shape)}"
        )
    acc = accumulation_dtype(v.dtype)
    with no_autocast(q.device):
        mix = mixing.to(acc)
        q_blocks, k_blocks = _to_blocks(q.to(acc), plan), _masked_keys(k.to(acc), plan)
        summaries = k_blocks.transpose(-1, -2) @ _to_blocks(v.to(acc), plan)  # (B, H, M, d, d_v)
        out = q_blocks @ _mix(mix, summaries)  # (B, H, M, L, d_v)
        if normalize:
            if separate:
                q_blocks, k_blocks = _to_blocks(nq.to(acc), plan), _masked_keys(nk.to(acc), plan)
            key_sums = _mix(mix, k_blocks.sum(dim=-2))  # (B, H, M, d)
            out = out / guard_denominator(q_blocks @ key_sums.unsqueeze(-1), eps)
        out = _from_blocks(out, plan)
    return out.to(v.dtype)


def mhla_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_index: Tensor | None,
    mixing: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    plan: BlockPlan | None = None,
    normalizer_q: Tensor | None = None,
    normalizer_k: Tensor | None = None,
) -> Tensor:
    """Multi-head linear attention with token-level heads (blocks) and learned mixing.

    q, k: (B, H, N, d) features; v: (B, H, N, d_v); block_index: (N,) long in [0, M);
    mixing: (M, M), row i = weights of query block i over key blocks.
    Block summaries S_b = Σ_{s∈b} k_s v_sᵀ, mixed S̃_i = Σ_j m_ij S_j, and query t in
    block i reads o_t = q_tᵀ S̃_i, divided (normalised, paper Eq. 4) by the guarded row
    sum n_q[t] · Σ_j m_ij Σ_{s∈j} n_k[s] with n_q, n_k = ``normalizer_q/k`` (un-rotated
    features under RoPE) or q, k. Equivalent to A[t, s] = m_{b(t), b(s)} q_t·k_s.
    Cost O(N·d·(d_v+1) + M²·d·(d_v+1)).

    The block index is validated and turned into a :class:`BlockPlan` on the host; pass
    ``plan`` (e.g. :func:`mhla_grid_plan`) to skip that (``block_index`` is then unused).
    """
    check_same_tokens("mhla_attention", q, k, v)
    if plan is None:
        if mixing.dim() != 2 or mixing.shape[0] != mixing.shape[1]:
            raise ValueError(f"mhla_attention: mixing must be (M, M), got {tuple(mixing.shape)}")
        if block_index is None or block_index.shape != (q.shape[2],):
            shape = None if block_index is None else tuple(block_index.shape)
            raise ValueError(f"mhla_attention: block_index must have shape ({q.shape[2]},), got {shape}")
        plan = mhla_index_plan(block_index, mixing.shape[0])
    return _mhla_core(q, k, v, mixing, plan, normalize, eps, normalizer_q, normalizer_k)


def mhla_grid_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: Grid,
    layout: Grid,
    mixing: Tensor,
    *,
    normalize: bool = True,
    eps: float = 1e-6,
    normalizer_q: Tensor | None = None,
    normalizer_k: Tensor | None = None,
) -> Tensor:
    """:func:`mhla_attention` with the blocks of ``layout`` on the token grid ``grid`` (python ints).

    The plan comes from :func:`mhla_grid_plan` (cached per grid, layout and device); no
    tensor value is read on the host.
    """
    check_same_tokens("mhla_grid_attention", q, k, v)
    if math.prod(grid) != q.shape[2]:
        raise ValueError(
            f"mhla_grid_attention: grid {tuple(grid)} has {math.prod(grid)} tokens, inputs have {q.shape[2]}"
        )
    plan = mhla_grid_plan(tuple(grid), tuple(layout), q.device)
    return _mhla_core(q, k, v, mixing, plan, normalize, eps, normalizer_q, normalizer_k)
