"""Throughput and cost measurements (spec: ``fvd.md``, section "Throughput and cost").

Usage::

    python -m eval.throughput attention [--tokens 1024 ... 65536] [--variants softmax linear hla mhla]
        [--batch 1] [--heads 8] [--head-dim 64] [--dtype float32] [--device cpu|cuda]
        [--budget-s 20] [--repeats 3] [--warmup 1] [--hla-order 2] [--hla-rank 16]
        [--hla-form state|value_modulation|both] [--isolation auto|subprocess|inprocess] [--out DIR]
    python -m eval.throughput attention --from-json outputs/benchmarks/attention-cpu/attention.json

Subcommands:

``attention``
    Op-level cost of each attention core vs the number of tokens N: forward and
    forward+backward time, peak memory, the spec's FLOP count, the fitted exponent of
    time vs N and the speedup over softmax. Writes ``attention.json`` (raw numbers),
    ``attention.md`` (tables) and ``attention.png`` (log-log plot) to ``--out``.
    ``--from-json`` rebuilds the tables and the plot from a saved ``attention.json``.

``train`` / ``sample`` (in :mod:`eval.dit_throughput`)
    A training step of the real DiT per attention variant over latent sizes: samples/s,
    tokens/s, model FLOP/s, MFU and peak memory; and sampling latency per video.

The helpers in the first part of this file (timing with device synchronisation, device
and git provenance, peak memory, exponent fits, markdown / JSON / PNG output) are shared
by all subcommands; a subcommand adds a ``_add_<name>_parser`` function and a
``run_<name>(args)`` entry point returning the JSON-able result.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


# ============================================================================ shared helpers


def resolve_device(name: str | None) -> torch.device:
    """``None`` -> cuda when available, else cpu; asking for cuda without one is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU), so wall-clock timers measure the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: torch.device) -> dict:
    """What the numbers were measured on: device name, torch version, threads, load."""
    info = {
        "type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host_cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=torch.cuda.get_device_name(index),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    else:
        info["name"] = f"{info['host_cpu']} ({info['torch_threads']} torch threads, {info['cpu_count']} CPUs)"
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_state(root: Path = REPO_ROOT, watch: Sequence[str] = ()) -> dict:
    """Short HEAD commit, and which watched paths differ from it (uncommitted or untracked)."""

    def git(*cmd: str) -> str | None:
        try:
            out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.rstrip() if out.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", *watch) if watch else git("status", "--porcelain")
    return {"commit": commit, "uncommitted": changed.splitlines() if changed else []}


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def time_calls(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float | None = None,
    setup: Callable[[], object] | None = None,
) -> dict:
    """Time ``warmup + repeats`` calls of ``fn`` (``setup`` runs untimed before each).

    Each call is timed with ``time.perf_counter`` with the device synchronised at both
    timer boundaries. Calls stop as soon as one takes longer than ``budget_s``; when that
    happens during warm-up, the over-budget call is kept as the only sample (at that size
    warm-up overheads are negligible), so every timing has at least one sample.
    Returns the median, min, all samples (seconds) and whether the budget was exceeded.
    """
    warm: list[float] = []
    samples: list[float] = []
    over_budget = False
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        (warm if i < warmup else samples).append(elapsed)
        if budget_s is not None and elapsed > budget_s:
            over_budget = True
            break
    if not samples:
        samples = [warm.pop()]
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "samples_s": samples,
        "warmup_s": warm,
        "over_budget": over_budget,
    }


def _proc_status_bytes(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0). False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory increase over a block of code.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
    what was allocated at the start (tensor memory only, not the caching allocator's
    reserve). CPU: peak resident set size (VmHWM, reset through ``/proc/self/clear_refs``)
    minus the RSS at the start. RSS counts every page the process touches, so it is only
    meaningful in a fresh process: memory freed earlier may be reused from the heap
    without raising RSS (under-report), and it includes allocator slack (over-report).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_bytes: int | None = None
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            self.method = "cuda max_memory_allocated - allocated at start"
        else:
            reset = _reset_peak_rss()
            self._base = _proc_status_bytes("VmRSS")
            self.method = "VmHWM - VmRSS at start" + ("" if reset else " (VmHWM could not be reset)")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            hwm = _proc_status_bytes("VmHWM")
            if hwm is not None and self._base is not None:
                self.peak_bytes = max(0, hwm - self._base)


def fit_exponent(ns: Sequence[float], times: Sequence[float]) -> float | None:
    """Least-squares slope of log(time) vs log(N); None with fewer than two distinct N."""
    pairs = [(math.log(n), math.log(t)) for n, t in zip(ns, times) if n > 0 and t and t > 0]
    if len({x for x, _ in pairs}) < 2:
        return None
    mean_x = sum(x for x, _ in pairs) / len(pairs)
    mean_y = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mean_x) ** 2 for x, _ in pairs)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in pairs)
    return sxy / sxx


def format_ms(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def format_number(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def format_tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one character per column (l/r/c), default l then r."""
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": ":--", "r": "--:", "c": ":-:"}
    lines = [
        "| " + " | ".join(str(h) for h in headers) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def loglog_plot(
    path: Path,
    panels: Sequence[tuple[str, dict[str, list[tuple[float, float, bool]]]]],
    *,
    xlabel: str,
    ylabel: str,
    suptitle: str = "",
    guides: Sequence[int] = (1, 2),
) -> None:
    """One log-log panel per (title, {series: [(x, y, hollow), ...]}); PNG via the Agg backend.

    Hollow markers flag special points (e.g. over the time budget). ``guides`` draws
    dashed reference slopes (∝ x^k) through the smallest point of each panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        all_points = [p for pts in series.values() for p in pts]
        for i, (name, pts) in enumerate(series.items()):
            if not pts:
                continue
            color = f"C{i % 10}"  # by series position, so a series has one colour in every panel
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=name)
            hollow = [p for p in pts if p[2]]
            if hollow:
                ax.plot([p[0] for p in hollow], [p[1] for p in hollow], "o", markersize=11,
                        markerfacecolor="none", markeredgecolor=color)
        if all_points:
            x0 = min(p[0] for p in all_points)
            x1 = max(p[0] for p in all_points)
            y0 = min(p[1] for p in all_points if p[0] == x0)
            for k in guides:
                ax.plot([x0, x1], [y0, y0 * (x1 / x0) ** k], ":", color="grey", linewidth=1)
                ax.annotate("∝N" if k == 1 else f"∝N$^{k}$", (x1, y0 * (x1 / x0) ** k), color="grey",
                            fontsize=8, ha="right", va="bottom")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = sorted({p[0] for p in all_points})
        if xs:
            ax.set_xticks(xs, [format_tokens(int(x)) for x in xs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_out_dir(benchmark: str, device: torch.device) -> Path:
    return Path("outputs") / "benchmarks" / f"{benchmark}-{device.type}"


# ============================================================================ attention

ATTENTION_VARIANTS = ("softmax", "linear", "hla", "mhla")
HLA_FORMS = ("state", "value_modulation")
FIT_WINDOW = (4096, 16384)
# Targets from the issue: forward+backward speedup over softmax at N = 16k, and the
# time-vs-N exponent over the fit window.
TARGET_TOKENS = 16384
TARGET_SPEEDUP = {"mhla": 20.0, "hla": 5.0}
TARGET_MAX_EXPONENT = {"mhla": 1.2, "hla": 1.2}
_RESULT_MARK = "@@THROUGHPUT-RESULT@@"
# The code whose uncommitted changes the report lists next to the commit.
_WATCHED_PATHS = ("attention", "eval/throughput.py", "configs/attention")


def token_grid(num_tokens: int, frames: int = 16) -> tuple[int, int, int]:
    """A video-like grid (T, H, W) with T·H·W = N: square frames (H = W) where possible,
    T as close to ``frames`` as possible (ties -> fewer frames), else H, W as close as possible."""

    def divisors(n: int) -> list[int]:
        small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
        return sorted(set(small + [n // d for d in small]))

    best = None
    for t in divisors(num_tokens):
        rest = num_tokens // t
        for h in divisors(rest):
            w = rest // h
            if h > w:
                continue
            key = (w - h, abs(math.log2(t / frames)), t)
            if best is None or key < best[0]:
                best = (key, (t, h, w))
    return best[1]


def attention_config(variant: str, overrides: dict | None = None) -> dict:
    """The shipped config node of a variant (configs/attention/<variant>.yaml) plus overrides."""
    from omegaconf import OmegaConf

    path = REPO_ROOT / "configs" / "attention" / f"{variant}.yaml"
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    node.update(overrides or {})
    return node


@dataclass
class AttentionCase:
    """One attention core on concrete inputs: ``call()`` runs the core; ``leaves`` get gradients."""

    label: str
    call: Callable[[], Tensor]
    leaves: list[Tensor]
    flops: int  # forward FLOPs of the core (2 x the layer's core_macs), whole batch
    info: dict = field(default_factory=dict)


def _rms_normed(shape: tuple[int, ...], device: torch.device) -> Tensor:
    """randn passed through the per-head RMSNorm the layers apply to q and k (unit weight)."""
    x = torch.randn(shape, device=device)
    return F.rms_norm(x, (shape[-1],), eps=1e-6)


def build_attention_case(
    variant: str,
    num_tokens: int,
    *,
    batch: int = 1,
    heads: int = 8,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    hla_order: int | None = None,
    hla_rank: int | None = None,
    hla_form: str = "state",
    seed: int = 0,
) -> AttentionCase:
    """Realistic core inputs for a variant, built through the variant's own layer.

    The layer (from the shipped config, via :func:`attention.build_attention`) supplies
    the settings (normalize, eps), the feature map, HLA's tied Taylor factors
    ``[1, x·W/√(p·√d)]`` (the same tensor for all p factors, as the layer does), MHLA's
    block index / locality mixing for the auto layout on :func:`token_grid` (N), and the
    FLOP count (``core_macs``). q and k are RMS-normalised randn as after the layers' qk
    RMSNorm, v is randn. The leaves are what the core sees: features/factors are
    detached, so forward+backward times the core only (no projections, feature maps,
    RoPE or output RMSNorm).
    """
    from attention import build_attention, hla_attention, linear_attention, mhla_attention, softmax_attention

    device = torch.device(device)
    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; choose from {ATTENTION_VARIANTS}")
    overrides = {}
    if variant == "hla":
        if hla_order is not None:
            overrides["order"] = hla_order
        if hla_rank is not None:
            overrides["rank"] = hla_rank or None  # 0 -> null: W = identity
    grid = token_grid(num_tokens)
    torch.manual_seed(seed)
    layer = build_attention(attention_config(variant, overrides), dim=heads * head_dim, num_heads=heads, grid=grid)
    layer = layer.to(device)
    shape = (batch, heads, num_tokens, head_dim)
    flops = 2 * batch * layer.core_macs()
    info: dict = {"grid": list(grid)}

    with torch.no_grad():
        q, k = _rms_normed(shape, device), _rms_normed(shape, device)
        v = torch.randn(shape, device=device)
        if variant == "softmax":
            tensors = [q, k]
        elif variant in ("linear", "mhla"):
            tensors = [layer.features(q), layer.features(k)]
        else:
            if layer.factors == "tied":
                tensors = [layer._taylor_factor(q), layer._taylor_factor(k)]
            else:
                tensors = [layer._positive(m(q)) for m in layer.q_maps] + [layer._positive(m(k)) for m in layer.k_maps]
    leaves = [t.to(dtype).requires_grad_() for t in tensors + [v]]
    v = leaves[-1]

    if variant == "softmax":
        q, k = leaves[0], leaves[1]
        label = "softmax"

        def call() -> Tensor:
            return softmax_attention(q, k, v)

    elif variant == "linear":
        q, k = leaves[0], leaves[1]
        label = "linear"
        info["normalize"] = layer.normalize

        def call() -> Tensor:
            return linear_attention(q, k, v, normalize=layer.normalize, eps=layer.eps)

    elif variant == "mhla":
        q, k = leaves[0], leaves[1]
        label = "mhla"
        mixing = layer.mixing.detach().clone().requires_grad_()  # learnable: it gets a gradient
        leaves.append(mixing)
        block_index = layer.block_index
        info.update(layout=list(layer.layout), blocks=math.prod(layer.layout), normalize=layer.normalize)

        def call() -> Tensor:
            return mhla_attention(q, k, v, block_index, mixing, normalize=layer.normalize, eps=layer.eps)

    else:
        order = layer.order
        if layer.factors == "tied":
            q_factors, k_factors = [leaves[0]] * order, [leaves[1]] * order
        else:
            q_factors, k_factors = leaves[:order], leaves[order : 2 * order]
        label = f"hla[{hla_form}]"
        info.update(
            order=order,
            factors=layer.factors,
            rank=layer.rank,
            factor_width=layer.factor_rank,
            kronecker_rank=layer.factor_rank**order,
            form=hla_form,
            normalize=layer.normalize,
        )

        def call() -> Tensor:
            return hla_attention(q_factors, k_factors, v, normalize=layer.normalize, eps=layer.eps, form=hla_form)

    return AttentionCase(label=label, call=call, leaves=leaves, flops=flops, info=info)


def measure_attention_point(spec: dict) -> dict:
    """Measure one (variant, N): forward+backward time and peak memory, then forward time.

    ``spec`` is JSON-able (it is sent to a fresh subprocess under ``--isolation subprocess``):
    variant, n, batch, heads, head_dim, dtype, device, hla_order, hla_rank, hla_form,
    seed, warmup, repeats, budget_s, threads. Forward runs under ``torch.no_grad()``;
    forward+backward is ``out.float().sum().backward()`` with gradients on every core
    input (grads cleared untimed before each call). Peak memory covers the
    forward+backward calls, which run first after the inputs are built; one untimed
    forward+backward on a tiny instance of the same variant runs before that, so that
    one-off lazy initialisation (e.g. ~80 MB of modules the first checkpointed backward
    loads) is not counted as the core's memory.
    """
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    common = dict(
        head_dim=spec["head_dim"],
        dtype=DTYPES[spec["dtype"]],
        device=device,
        hla_order=spec.get("hla_order"),
        hla_rank=spec.get("hla_rank"),
        hla_form=spec.get("hla_form", "state"),
    )
    tiny = build_attention_case(spec["variant"], min(spec["n"], 64), batch=1, heads=1, **common)
    tiny.call().float().sum().backward()
    del tiny
    case = build_attention_case(
        spec["variant"], spec["n"], batch=spec["batch"], heads=spec["heads"], seed=spec.get("seed", 0), **common
    )

    def clear_grads() -> None:
        for t in case.leaves:
            t.grad = None

    def forward_backward() -> None:
        case.call().float().sum().backward()

    def forward() -> None:
        with torch.no_grad():
            case.call()

    timing = {"warmup": spec["warmup"], "repeats": spec["repeats"], "budget_s": spec["budget_s"]}
    with PeakMemory(device) as memory:
        fwd_bwd = time_calls(forward_backward, device, setup=clear_grads, **timing)
    clear_grads()
    fwd = time_calls(forward, device, **timing)
    return {
        "label": case.label,
        "variant": spec["variant"],
        "n": spec["n"],
        "forward": fwd,
        "fwd_bwd": fwd_bwd,
        "peak_memory_bytes": memory.peak_bytes,
        "memory_method": memory.method,
        "flops_forward": case.flops,
        "info": case.info,
    }


def _measure_in_subprocess(spec: dict) -> dict:
    """Run :func:`measure_attention_point` in a fresh Python process (clean heap for RSS)."""
    code = (
        "import json, sys\n"
        "from eval.throughput import measure_attention_point, _RESULT_MARK\n"
        "print(_RESULT_MARK + json.dumps(measure_attention_point(json.loads(sys.argv[1]))), flush=True)\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK) :])
    reason = f"signal {-proc.returncode} (killed; out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"measurement subprocess failed with {reason}: {' | '.join(tail)}")


def attention_labels(variants: Sequence[str], hla_form: str) -> list[tuple[str, str | None]]:
    """(variant, hla form) pairs to measure, in order; 'both' measures HLA in each form."""
    pairs: list[tuple[str, str | None]] = []
    for variant in variants:
        if variant == "hla":
            forms = HLA_FORMS if hla_form == "both" else (hla_form,)
            pairs += [("hla", form) for form in forms]
        else:
            pairs.append((variant, None))
    return pairs


def _series(points: list[dict], label: str, mode: str) -> list[tuple[int, float, bool]]:
    """(N, median seconds, over budget) of one label's measured points, sorted by N."""
    rows = [(p["n"], p[mode]["median_s"], p[mode]["over_budget"]) for p in points if p["label"] == label and mode in p]
    return sorted(rows)


def attention_analysis(points: list[dict], labels: Sequence[str], window: tuple[int, int] = FIT_WINDOW) -> dict:
    """Exponents (whole range and ``window``), speedups vs softmax, HLA form comparison, targets."""
    modes = ("forward", "fwd_bwd")
    exponents: dict = {}
    for label in labels:
        exponents[label] = {}
        for mode in modes:
            series = _series(points, label, mode)
            inside = [(n, t) for n, t, _ in series if window[0] <= n <= window[1]]
            exponents[label][mode] = {
                "all": fit_exponent([n for n, _, _ in series], [t for _, t, _ in series]),
                "all_range": [series[0][0], series[-1][0]] if series else None,
                "window": fit_exponent([n for n, _ in inside], [t for _, t in inside]),
                "window_range": list(window),
                "window_points": len(inside),
            }

    speedups: dict = {}
    for mode in modes:
        softmax = {n: t for n, t, _ in _series(points, "softmax", mode)}
        speedups[mode] = {
            label: {str(n): softmax[n] / t for n, t, _ in _series(points, label, mode) if n in softmax}
            for label in labels
            if label != "softmax"
        }

    hla_forms = None
    state, vm = "hla[state]", "hla[value_modulation]"
    if state in labels and vm in labels:
        hla_forms = {}
        for mode in modes:
            a = {n: t for n, t, _ in _series(points, state, mode)}
            b = {n: t for n, t, _ in _series(points, vm, mode)}
            common = sorted(set(a) & set(b))
            ratios = {str(n): b[n] / a[n] for n in common}  # > 1: state is faster
            geomean = math.exp(sum(math.log(r) for r in ratios.values()) / len(ratios)) if ratios else None
            hla_forms[mode] = {
                "value_modulation_over_state": ratios,
                "geomean_ratio": geomean,
                "faster": None if geomean is None else ("state" if geomean > 1 else "value_modulation"),
                "state_wins_at": [n for n in common if a[n] < b[n]],
                "value_modulation_wins_at": [n for n in common if b[n] < a[n]],
            }

    targets = []
    for label in labels:
        variant = label.split("[")[0]
        if variant not in TARGET_SPEEDUP:
            continue
        speedup = speedups["fwd_bwd"].get(label, {}).get(str(TARGET_TOKENS))
        targets.append(
            {
                "label": label,
                "what": f"fwd+bwd speedup vs softmax at N={TARGET_TOKENS} >= {TARGET_SPEEDUP[variant]:g}x",
                "value": speedup,
                "met": None if speedup is None else speedup >= TARGET_SPEEDUP[variant],
            }
        )
        for mode in modes:
            exponent = exponents[label][mode]["window"]
            targets.append(
                {
                    "label": label,
                    "what": f"{_MODE_NAMES[mode]} exponent over {format_tokens(window[0])}-{format_tokens(window[1])}"
                    f" <= {TARGET_MAX_EXPONENT[variant]:g}",
                    "value": exponent,
                    "met": None if exponent is None else exponent <= TARGET_MAX_EXPONENT[variant],
                }
            )
    return {"exponents": exponents, "speedups": speedups, "hla_forms": hla_forms, "targets": targets}


_MODE_NAMES = {"forward": "forward", "fwd_bwd": "forward+backward"}


def _token_table(tokens, labels, by_key: dict, cell) -> str:
    """Markdown table with a row per token count and a column per variant label;
    ``cell(point, n, label)`` formats a measured point, missing points show a dash."""
    rows = [
        [format_tokens(n)] + [cell(by_key[(label, n)], n, label) if (label, n) in by_key else "—" for label in labels]
        for n in tokens
    ]
    return markdown_table(["N"] + labels, rows)


def attention_markdown(result: dict) -> str:
    """The markdown report: provenance, one time table per mode, memory, FLOPs, exponents, targets."""
    settings, device, analysis = result["settings"], result["device"], result["analysis"]
    labels = result["labels"]
    points = result["points"]
    by_key = {(p["label"], p["n"]): p for p in points}
    tokens = sorted({p["n"] for p in points} | set(settings["tokens"]))
    skipped = result["skipped"]
    git = result["git"]
    commit = git["commit"] + (" (with uncommitted changes in: " + ", ".join(
        sorted({line[3:] for line in git["uncommitted"]})) + ")" if git["uncommitted"] else "")
    isolation = {
        "subprocess": "each (variant, N) measured in a fresh Python subprocess",
        "inprocess": "all points measured in one process",
    }[settings["isolation"]]
    git_end = result.get("git_end")
    if git_end and git_end != git:
        commit += (f"; NOTE: the code changed during the run (at the end: {git_end['commit']}"
                   + (", uncommitted: " + ", ".join(sorted({line[3:] for line in git_end["uncommitted"]}))
                      if git_end["uncommitted"] else "") + ")")
    lines = [
        "# Attention cores: time vs N",
        "",
        f"- command: `{result['command']}`",
        f"- date: {result['date']}; git commit: {commit}",
        f"- device: {device['name']}" + (f" (host CPU {device['host_cpu']})" if device["type"] == "cuda" else ""),
        f"- torch {device['torch']}, Python {device['python']}; load average before/after: "
        f"{result['load_average']['before']} / {result['load_average']['after']}",
        f"- shape (B, H, N, d) = ({settings['batch']}, {settings['heads']}, N, {settings['head_dim']}), "
        f"dtype {settings['dtype']}; HLA order {settings['hla']['order']}, rank {settings['hla']['rank']} "
        f"(factor width {settings['hla']['factor_width']}, Kronecker rank R = {settings['hla']['kronecker_rank']}); "
        f"MHLA auto layout, normalize={settings['mhla_normalize']}; linear normalize={settings['linear_normalize']}",
        f"- timing: median of {settings['repeats']} calls after {settings['warmup']} warm-up call(s), "
        f"perf_counter with device synchronisation at both ends; forward under `torch.no_grad()`; "
        f"forward+backward = `out.float().sum().backward()` with gradients for every core input "
        f"(and MHLA's mixing matrix); core only (inputs already feature-mapped, no projections/RoPE)",
        f"- budget: a variant stops (larger N skipped) after a forward+backward call takes more than "
        f"{settings['budget_s']:g} s; † marks a time with fewer samples because a call exceeded the budget; "
        f"— = not measured; ({isolation})",
        "",
    ]
    for mode in ("forward", "fwd_bwd"):
        lines += [f"## {_MODE_NAMES[mode].capitalize()} time, ms (×speedup vs softmax)", ""]
        def time_cell(p: dict, n: int, label: str, mode: str = mode) -> str:
            cell = format_ms(p[mode]["median_s"]) + ("†" if p[mode]["over_budget"] else "")
            speedup = analysis["speedups"][mode].get(label, {}).get(str(n))
            return cell if speedup is None else cell + f" (×{speedup:.1f})"

        lines += [_token_table(tokens, labels, by_key, time_cell), ""]

    method = next((p["memory_method"] for p in points if p.get("memory_method")), "n/a")
    mem_note = (
        "peak RSS increase over the forward+backward calls in a fresh process: " + method
        if device["type"] != "cuda"
        else "peak allocated tensor memory over the forward+backward calls: " + method
    )
    if device["type"] != "cuda" and settings["isolation"] != "subprocess":
        mem_note += "; measured in-process, so it may under-report (heap reuse across points)"
    lines += [f"## Peak memory of forward+backward, MiB ({mem_note}; inputs excluded)", ""]
    def memory_cell(p: dict, n: int, label: str) -> str:
        mem = p.get("peak_memory_bytes")
        return "—" if mem is None else f"{mem / MIB:.1f}"

    lines += [_token_table(tokens, labels, by_key, memory_cell), ""]

    lines += ["## Forward GFLOP (spec count) / achieved GFLOP/s", ""]
    def flops_cell(p: dict, n: int, label: str) -> str:
        gflop = p["flops_forward"] / 1e9
        return f"{gflop:.3g} / {gflop / p['forward']['median_s']:.1f}"

    lines += [_token_table(tokens, labels, by_key, flops_cell), ""]

    window = settings["fit_window"]
    lines += ["## Fitted exponent of time vs N (least-squares slope of log t vs log N)", ""]
    rows = []
    for label in labels:
        e = analysis["exponents"][label]
        rng = e["forward"]["all_range"]
        rows.append(
            [
                label,
                "—" if rng is None else f"{format_tokens(rng[0])}–{format_tokens(rng[1])}",
                format_number(e["forward"]["all"]),
                format_number(e["fwd_bwd"]["all"]),
                format_number(e["forward"]["window"]),
                format_number(e["fwd_bwd"]["window"]),
            ]
        )
    win = f"{format_tokens(window[0])}–{format_tokens(window[1])}"
    lines += [
        markdown_table(
            ["variant", "measured range", "forward (all)", "fwd+bwd (all)", f"forward ({win})", f"fwd+bwd ({win})"],
            rows,
        ),
        "",
    ]
    if any(skipped.values()):
        lines += ["Stopped by the budget: " + "; ".join(
            f"{label} skipped N = {', '.join(format_tokens(n) for n in ns)}" for label, ns in skipped.items() if ns
        ) + ".", ""]
    errors = result.get("errors") or {}
    if errors:
        lines += ["Errors: " + "; ".join(f"{label}: {msg}" for label, msg in errors.items()), ""]

    if analysis["hla_forms"]:
        lines += ["## HLA forms: value_modulation time / state time (> 1: state is faster)", ""]
        forms = analysis["hla_forms"]
        ns = sorted({int(n) for mode in forms for n in forms[mode]["value_modulation_over_state"]})
        rows = [
            [format_tokens(n)] + [format_number(forms[mode]["value_modulation_over_state"].get(str(n))) for mode in forms]
            for n in ns
        ]
        rows.append(["geomean"] + [format_number(forms[mode]["geomean_ratio"]) for mode in forms])
        rows.append(["faster"] + [str(forms[mode]["faster"]) for mode in forms])
        lines += [markdown_table(["N", "forward", "forward+backward"], rows), ""]

    if analysis["targets"]:
        lines += ["## Targets", ""]
        rows = [
            [t["label"], t["what"], format_number(t["value"]), {True: "met", False: "NOT met", None: "n/a"}[t["met"]]]
            for t in analysis["targets"]
        ]
        lines += [markdown_table(["variant", "target", "measured", "status"], rows, align="llrl"), ""]
    return "\n".join(lines)


def _add_attention_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention",
        help="forward / forward+backward time and memory of the attention cores vs N",
        description=__doc__.split("Subcommands:")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536],
                   help="token counts N")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--variants", nargs="+", choices=ATTENTION_VARIANTS, default=list(ATTENTION_VARIANTS))
    p.add_argument("--budget-s", type=float, default=20.0,
                   help="stop a variant (skip larger N) once one forward+backward call takes longer")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode; the median is reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before the timed ones")
    p.add_argument("--hla-order", type=int, default=None, help="HLA order p (default: configs/attention/hla.yaml)")
    p.add_argument("--hla-rank", type=int, default=None,
                   help="HLA factor rank r, 0 = identity W (default: configs/attention/hla.yaml)")
    p.add_argument("--hla-form", choices=[*HLA_FORMS, "both"], default="state")
    p.add_argument("--fit-window", type=int, nargs=2, default=list(FIT_WINDOW), metavar=("N_MIN", "N_MAX"),
                   help="token range of the second exponent fit")
    p.add_argument("--isolation", choices=["auto", "subprocess", "inprocess"], default="auto",
                   help="auto: a fresh subprocess per (variant, N) on CPU (honest peak RSS), in-process on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: outputs/benchmarks/attention-<device type>")
    p.add_argument("--from-json", type=Path, default=None, metavar="FILE",
                   help="measure nothing: rebuild the analysis, markdown and plot from a saved attention.json "
                        "(written to --out, default the file's folder)")
    p.set_defaults(func=run_attention)


def _progress_line(point: dict, elapsed_s: float) -> str:
    def timing(mode: str) -> str:
        return f"{format_ms(point[mode]['median_s']):>8} ms{'†' if point[mode]['over_budget'] else ' '}"

    mem = point["peak_memory_bytes"]
    return (
        f"  {point['label']:<22} N={point['n']:>7}  forward {timing('forward')}  fwd+bwd {timing('fwd_bwd')}  "
        f"peak {'—' if mem is None else f'{mem / MIB:.1f} MiB'}  [{elapsed_s:.0f} s]"
    )


def run_attention(args: argparse.Namespace) -> dict:
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        write_attention_outputs(result, args.out or args.from_json.parent)
        return result
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    isolation = args.isolation if args.isolation != "auto" else ("subprocess" if device.type == "cpu" else "inprocess")
    out_dir = args.out or default_out_dir("attention", device)
    tokens = sorted(set(args.tokens))
    pairs = attention_labels(args.variants, args.hla_form)
    labels = [variant if form is None else f"hla[{form}]" for variant, form in pairs]

    # Settings the layers resolve from the configs (HLA ranks, normalisation), for the report.
    probe_n = tokens[0]
    hla_info = {}
    if "hla" in args.variants:
        hla_info = build_attention_case("hla", probe_n, batch=1, heads=1, head_dim=args.head_dim,
                                        hla_order=args.hla_order, hla_rank=args.hla_rank).info
    settings = {
        "tokens": tokens,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": args.dtype,
        "variants": list(args.variants),
        "hla_form": args.hla_form,
        "hla": {key: hla_info.get(key) for key in ("order", "rank", "factor_width", "kronecker_rank", "factors",
                                                    "normalize")},
        "linear_normalize": attention_config("linear").get("normalize"),
        "mhla_normalize": attention_config("mhla").get("normalize"),
        "budget_s": args.budget_s,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "fit_window": list(args.fit_window),
        "isolation": isolation,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    result = {
        "benchmark": "attention",
        "command": "python -m eval.throughput " + shlex.join(getattr(args, "argv", sys.argv[1:])),
        "date": utc_now(),
        "git": git_state(REPO_ROOT, watch=_WATCHED_PATHS),
        "device": device_info(device),
        "load_average": {"before": load_average(), "after": None},
        "settings": settings,
        "labels": labels,
        "points": [],
        "skipped": {label: [] for label in labels},
        "errors": {},
    }
    print(f"attention benchmark on {result['device']['name']}, torch {torch.__version__}, "
          f"git {result['git']['commit']}, {result['date']}")
    print("settings: " + json.dumps({k: v for k, v in settings.items() if k != "tokens"}))
    print(f"tokens: {tokens}\n", flush=True)

    started = time.perf_counter()
    for (variant, form), label in zip(pairs, labels):
        for i, n in enumerate(tokens):
            spec = {
                "variant": variant, "n": n, "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
                "dtype": args.dtype, "device": str(device), "hla_order": args.hla_order, "hla_rank": args.hla_rank,
                "hla_form": form or "state", "seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
                "budget_s": args.budget_s, "threads": torch.get_num_threads(),
            }
            try:
                point = _measure_in_subprocess(spec) if isolation == "subprocess" else measure_attention_point(spec)
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # OOM or a failed subprocess
                result["errors"][label] = f"N={n}: {exc}"
                result["skipped"][label] = tokens[i:]
                print(f"  {label:<22} N={n:>7}  FAILED: {exc}; skipping larger N", flush=True)
                break
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["points"].append(point)
            print(_progress_line(point, time.perf_counter() - started), flush=True)
            if point["fwd_bwd"]["over_budget"]:
                result["skipped"][label] = tokens[i + 1 :]
                if tokens[i + 1 :]:
                    print(f"  {label}: a forward+backward call exceeded {args.budget_s:g} s; skipping N = "
                          f"{tokens[i + 1:]}", flush=True)
                break
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    # Subprocess points import the code afresh: say so if it changed while we measured.
    result["git_end"] = git_state(REPO_ROOT, watch=_WATCHED_PATHS)
    result["load_average"]["after"] = load_average()
    write_attention_outputs(result, Path(out_dir))
    return result


def write_attention_outputs(result: dict, out_dir: Path) -> None:
    """(Re)compute the analysis of ``result`` and write attention.json / .md / .png; print the tables."""
    settings = result["settings"]
    result["analysis"] = attention_analysis(result["points"], result["labels"], tuple(settings["fit_window"]))
    markdown = attention_markdown(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "attention.json", result)
    (out_dir / "attention.md").write_text(markdown + "\n")
    shape = f"B={settings['batch']}, H={settings['heads']}, d={settings['head_dim']}, {settings['dtype']}"
    panels = [
        (f"{_MODE_NAMES[mode]} ({shape})", {label: _series(result["points"], label, mode) for label in result["labels"]})
        for mode in ("forward", "fwd_bwd")
    ]
    loglog_plot(out_dir / "attention.png", panels, xlabel="tokens N", ylabel="time (s)",
                suptitle=f"{result['device']['name']} · torch {result['device']['torch']} · {result['git']['commit']} · "
                         f"{result['date']} (hollow: over budget)")
    print("\n" + markdown)
    print(f"wrote {out_dir / 'attention.json'}, {out_dir / 'attention.md'}, {out_dir / 'attention.png'}"
          + (f" ({result['elapsed_s']:.0f} s)" if result.get("elapsed_s") is not None else ""))


# ============================================================================ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval.throughput",
        description="Throughput and cost benchmarks for linvid (spec: fvd.md, 'Throughput and cost').",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{attention,train,sample}")
    _add_attention_parser(sub)
    from .dit_throughput import add_sample_parser, add_train_parser  # the DiT-level benchmarks

    add_train_parser(sub)
    add_sample_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse ``argv`` (default: sys.argv[1:]), run the subcommand, return its JSON-able result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    # Turn SIGTERM into SystemExit so that a running measurement subprocess is killed with us.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
