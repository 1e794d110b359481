"""What every benchmark shares: timing with device synchronisation, peak memory, provenance, fits and output.

Benchmarks (:mod:`eval.attention_benchmark`, :mod:`eval.dit_benchmark`, run through
``python -m eval.throughput``) time calls with :func:`time_calls`, measure memory with
:class:`PeakMemory`, start every result with :func:`run_header` (command, date, commit,
device, load) and write JSON, markdown tables and log-log plots with the helpers below.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import torch

from configs.files import atomic_write_text

matplotlib.use("Agg")

REPO_ROOT = Path(__file__).resolve().parent.parent
_RESULT_MARK = "@@BENCHMARK-RESULT@@"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


def resolve_device(name: str | None) -> torch.device:
    """``None`` -> cuda when available, else cpu; asking for cuda without one is an error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda was requested but torch.cuda.is_available() is False; use device=cpu or null")
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
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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
    import matplotlib.pyplot as plt  # the Agg backend (set at import of this module)
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


def run_header(device: torch.device, command: str, watch: Sequence[str] = ()) -> dict:
    """Provenance every benchmark result starts with: command, date, commit, device, load."""
    return {"command": command, "date": utc_now(), "git": git_state(REPO_ROOT, watch=watch),
            "device": device_info(device), "load_average": {"before": load_average(), "after": None}}


class OutOfTime(RuntimeError):
    """A measurement did not finish within the time it was given."""


def in_fresh_process(function: str, spec: dict, timeout_s: float | None = None) -> dict:
    """``function(spec)`` (``"module:name"``) in a new Python process; returns its JSON-able result.

    A fresh process gives honest peak-RSS numbers on CPU and carries no allocator state from
    earlier measurements. A process that dies (e.g. killed when out of memory) raises
    RuntimeError with the reason; one still running after ``timeout_s`` is killed and raises
    :class:`OutOfTime`.
    """
    module, name = function.split(":")
    code = (f"import json, sys\nfrom {module} import {name}\n"
            f"print({_RESULT_MARK!r} + json.dumps({name}(json.loads(sys.argv[1]))), flush=True)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        raise OutOfTime(f"{function} did not finish within {timeout_s:.0f} s") from error
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARK):
            return json.loads(line[len(_RESULT_MARK):])
    reason = f"signal {-proc.returncode} (killed; out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    raise RuntimeError(f"measurement subprocess failed with {reason}: {' | '.join(tail)}")
