"""The analysis and report of the attention benchmark: exponent fits, speedups, HLA forms, targets, tables, plot.

:func:`write_attention_outputs` turns a measured (or saved) ``attention.json`` result into
``attention.md`` and ``attention.png``; :mod:`eval.attention_benchmark` measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from configs.files import atomic_write_text
from configs.logs import get_logger
from eval.benchmark import (
    MIB,
    fit_exponent,
    format_ms,
    format_number,
    format_tokens,
    loglog_plot,
    markdown_table,
    write_json,
)

logger = get_logger(__name__)

FIT_WINDOW = (4096, 16384)
# Goals for the attention cores: forward+backward speedup over softmax at N = 16k, and the
# time-vs-N exponent over the fit window.
TARGET_TOKENS = 16384
TARGET_SPEEDUP = {"mhla": 20.0, "hla": 5.0}
TARGET_MAX_EXPONENT = {"mhla": 1.2, "hla": 1.2}


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


def write_attention_outputs(result: dict, out_dir: Path) -> None:
    """(Re)compute the analysis of ``result`` and write attention.json / .md / .png; print the tables."""
    settings = result["settings"]
    result["analysis"] = attention_analysis(result["points"], result["labels"], tuple(settings["fit_window"]))
    markdown = attention_markdown(result)
    write_json(out_dir / "attention.json", result)
    atomic_write_text(out_dir / "attention.md", markdown + "\n")
    shape = f"B={settings['batch']}, H={settings['heads']}, d={settings['head_dim']}, {settings['dtype']}"
    panels = [
        (f"{_MODE_NAMES[mode]} ({shape})", {label: _series(result["points"], label, mode) for label in result["labels"]})
        for mode in ("forward", "fwd_bwd")
    ]
    loglog_plot(out_dir / "attention.png", panels, xlabel="tokens N", ylabel="time (s)",
                suptitle=f"{result['device']['name']} · torch {result['device']['torch']} · {result['git']['commit']} · "
                         f"{result['date']} (hollow: over budget)")
    logger.info("\n" + markdown)
    logger.info(f"wrote {out_dir / 'attention.json'}, {out_dir / 'attention.md'}, {out_dir / 'attention.png'}"
                + (f" ({result['elapsed_s']:.0f} s)" if result.get("elapsed_s") is not None else ""))
