"""One benchmark suite for a GPU, in minutes: ``python -m eval.throughput suite [budget_s=480 out=<dir>]``.

Three sections, each in one fresh process with a share of the time budget, every point
measured eager and compiled (``torch.compile``), most important first so that whatever the
budget cuts is the least important:

1. attention cores, bf16, forward and forward+backward, N = 4k … 128k tokens: softmax through
   SDPA (the backend that ran, e.g. FlashAttention, is read from the profiler) against linear,
   HLA and MHLA; speedups over softmax and fitted exponents;
2. the DiT training step per variant at ``model=B`` on 16×32×32 latents (4,096 tokens) and at a
   long-video shape, 21×60×104 latents = 21×30×52 = 32,760 tokens with gradient checkpointing:
   tokens/s, MFU against the device's bf16 dense peak, peak memory;
3. sampling latency of one video per variant.

``quick=true`` runs the same code on CPU at tiny sizes, for two of the DiT variants, and
compiles with the ``aot_eager`` backend (the same graphs, without inductor's code generation):
the test suite runs it. Writes ``suite.json``, ``suite.md`` and ``suite.png`` to ``out``; nothing beyond the
project's own install is needed, so the same command works on any GPU machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from attention import VARIANTS
from configs.entry import compose_config
from configs.files import atomic_write_text
from configs.logs import get_logger
from eval.attention_benchmark import measure_attention_point
from eval.benchmark import (
    OutOfTime,
    default_out_dir,
    format_ms,
    format_tokens,
    in_fresh_process,
    loglog_plot,
    markdown_table,
    resolve_device,
    run_header,
    write_json,
)
from eval.dit_benchmark import (
    device_peak_flops,
    measure_sample_point,
    measure_train_point,
)

logger = get_logger(__name__)

SECTIONS = ("attention", "train", "sample")
BUDGET_SHARES = {"attention": 0.35, "train": 0.45, "sample": 0.15}  # the rest: start-up and the report
CORE_VARIANTS = VARIANTS  # the attention registry's cores
DIT_VARIANTS = (*VARIANTS, "hybrid")  # configs/attention: the cores and the hybrid pattern
# Goals the report checks (a benchmark, not a test).
GOALS = {"core_speedup_32k": {"mhla": 20.0, "hla": 5.0}, "dit_b_long_mhla_over_softmax": 3.0,
         "softmax_mfu_4k": 0.40}


def suite_plan(cfg: DictConfig) -> dict:
    """Sizes of every section: the full GPU plan, or tiny CPU sizes with ``quick=true``."""
    if cfg.quick:
        return {"dtype": "float32", "compile_backend": "aot_eager", "tokens": [64], "heads": 2, "head_dim": 16,
                "model": "tiny", "channels": 3,
                "shapes": [{"frames": 2, "height": 8, "width": 8, "checkpointing": True}],
                "sample_steps": 1, "repeats": 1, "dit_variants": ["softmax", "mhla"]}
    return {"dtype": "bfloat16", "compile_backend": "inductor",
            "tokens": [4096, 8192, 16384, 32768, 65536, 131072], "heads": 12, "head_dim": 64, "model": "B",
            "channels": 4, "shapes": [{"frames": 16, "height": 32, "width": 32, "checkpointing": False},
                                      {"frames": 21, "height": 60, "width": 104, "checkpointing": True}],
            "sample_steps": 10, "repeats": 3, "dit_variants": list(DIT_VARIANTS)}


def _time_left(deadline: float) -> float:
    return deadline - time.perf_counter()


def attention_section(spec: dict) -> dict:
    """Every (compiled?, variant, N) core point that fits before ``spec['deadline_s']`` from now; in-process."""
    deadline = time.perf_counter() + spec["deadline_s"]
    points, skipped = [], []
    for compiled in (False, True):
        for variant in CORE_VARIANTS:
            for n in spec["tokens"]:
                if _time_left(deadline) < 5:
                    skipped.append({"variant": variant, "n": n, "compiled": compiled, "why": "time budget"})
                    continue
                point = {"variant": variant, "n": n, "batch": 1, "heads": spec["heads"], "head_dim": spec["head_dim"],
                         "dtype": spec["dtype"], "device": spec["device"], "hla_order": None, "hla_rank": None,
                         "hla_form": "auto", "seed": 0, "warmup": 1, "repeats": spec["repeats"],
                         "budget_s": min(30.0, _time_left(deadline) / 4), "threads": None,
                         "compile": spec["compile_backend"] if compiled else None}
                try:
                    points.append({**measure_attention_point(point), "compiled": compiled})
                except Exception as error:  # noqa: BLE001 - e.g. out of memory: record it, go on with the next variant
                    skipped.append({"variant": variant, "n": n, "compiled": compiled, "why": str(error)[:200]})
                    break
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    return {"points": points, "skipped": skipped, "sdpa_backend": sdpa_backend(spec)}


def sdpa_backend(spec: dict) -> str:
    """Which SDPA kernel runs softmax attention at the suite's shape, read from the profiler's op names."""
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    q = torch.randn(1, spec["heads"], spec["tokens"][0], spec["head_dim"], device=device, dtype=dtype)
    with torch.profiler.profile() as profiler:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    names = " ".join(event.key for event in profiler.key_averages())
    for op, backend in (("flash_attention", "FlashAttention"), ("efficient_attention", "memory-efficient"),
                        ("cudnn_attention", "cuDNN"), ("_scaled_dot_product_attention_math", "math")):
        if op in names:
            return backend + (" (CPU kernel)" if device.type == "cpu" else "")
    return "unknown"


def _dit_spec(spec: dict, variant: str, shape: dict, compiled: bool, budget_s: float) -> dict:
    model = OmegaConf.to_container(compose_config("train", [f"model={spec['model']}"]).model, resolve=True)
    model["gradient_checkpointing"] = shape["checkpointing"]
    return {"model": model, "variant": variant, "frames": shape["frames"], "size": None, "height": shape["height"],
            "width": shape["width"], "channels": spec["channels"], "batch": 1, "steps": spec["repeats"], "warmup": 1,
            "dtype": spec["dtype"], "device": spec["device"], "budget_s": budget_s, "threads": None,
            "peak_flops": spec["peak_flops"], "compile": spec["compile_backend"] if compiled else None,
            "repeats": spec["repeats"]}


def train_section(spec: dict) -> dict:
    """Every (compiled?, shape, variant) DiT training step that fits before the deadline; in-process."""
    deadline = time.perf_counter() + spec["deadline_s"]
    points, skipped = [], []
    for compiled in (False, True):
        for shape in spec["shapes"]:
            for variant in spec["dit_variants"]:
                if _time_left(deadline) < 10:
                    skipped.append({"variant": variant, **shape, "compiled": compiled, "why": "time budget"})
                    continue
                try:
                    point = measure_train_point(_dit_spec(spec, variant, shape, compiled, _time_left(deadline) / 3))
                    points.append({**point, "compiled": compiled})
                except Exception as error:  # noqa: BLE001 - e.g. out of memory: record it and go on
                    skipped.append({"variant": variant, **shape, "compiled": compiled, "why": str(error)[:200]})
                finally:
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
    return {"points": points, "skipped": skipped}


def sample_section(spec: dict) -> dict:
    """Sampling latency of one video per (compiled?, variant) at the first shape; in-process."""
    deadline = time.perf_counter() + spec["deadline_s"]
    points, skipped = [], []
    shape = spec["shapes"][0]
    for compiled in (False, True):
        for variant in spec["dit_variants"]:
            if _time_left(deadline) < 10:
                skipped.append({"variant": variant, "compiled": compiled, "why": "time budget"})
                continue
            point = {**_dit_spec({**spec, "channels": 3}, variant, shape, compiled, 0), "steps": spec["sample_steps"]}
            try:
                points.append({**measure_sample_point(point), "compiled": compiled})
            except Exception as error:  # noqa: BLE001 - e.g. out of memory: record it and go on
                skipped.append({"variant": variant, "compiled": compiled, "why": str(error)[:200]})
    return {"points": points, "skipped": skipped}


def run_suite(cfg: DictConfig, command: str) -> dict:
    """All sections within ``cfg.budget_s`` seconds; writes suite.json / .md / .png; returns the result."""
    started = time.perf_counter()
    device = resolve_device("cpu" if cfg.quick else cfg.device)
    plan = suite_plan(cfg)
    spec = {**plan, "device": str(device), "peak_flops": device_peak_flops(device, cfg.peak_tflops)}
    result = {"benchmark": "suite", **run_header(device, command), "quick": cfg.quick, "budget_s": cfg.budget_s,
              "plan": plan, "sections": {}}
    for section in SECTIONS:
        share = cfg.budget_s * BUDGET_SHARES[section]
        remaining = cfg.budget_s - (time.perf_counter() - started) - 10
        seconds = max(0.0, min(share, remaining))
        logger.info(f"suite: {section} section, {seconds:.0f} s")
        try:
            result["sections"][section] = in_fresh_process(f"eval.suite:{section}_section",
                                                           {**spec, "deadline_s": seconds}, timeout_s=seconds + 120)
        except (OutOfTime, RuntimeError) as error:
            result["sections"][section] = {"points": [], "skipped": [], "error": str(error)}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    result["goals"] = goals(result)
    write_suite_outputs(result, Path(cfg.out) if cfg.out else default_out_dir("suite", device))
    return result


def _median(points, **match) -> float | None:
    found = [p for p in points if all(p.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def goals(result: dict) -> list[dict]:
    """The suite's goals, met or not, from the measured points (None where a point is missing)."""
    attention = result["sections"].get("attention", {}).get("points", [])
    train = result["sections"].get("train", {}).get("points", [])
    rows = []
    softmax = _median(attention, variant="softmax", n=32768, compiled=False)
    for variant, target in GOALS["core_speedup_32k"].items():
        point = _median(attention, variant=variant, n=32768, compiled=False)
        value = softmax["fwd_bwd"]["median_s"] / point["fwd_bwd"]["median_s"] if softmax and point else None
        rows.append({"goal": f"{variant} core fwd+bwd at 32k ≥ {target:g}× softmax (SDPA)", "value": value,
                     "met": None if value is None else value >= target})
    long = [p for p in train if p["tokens_per_sample"] >= 32000 and not p["compiled"]]
    mhla, soft = _median(long, variant="mhla"), _median(long, variant="softmax")
    value = mhla["tokens_per_s"] / soft["tokens_per_s"] if mhla and soft else None
    rows.append({"goal": "DiT-B training at 32,760 tokens: MHLA ≥ 3× softmax tokens/s", "value": value,
                 "met": None if value is None else value >= GOALS["dit_b_long_mhla_over_softmax"]})
    short = _median([p for p in train if p["tokens_per_sample"] == 4096 and not p["compiled"]], variant="softmax")
    value = short["mfu"] if short else None
    rows.append({"goal": "softmax MFU at 4,096 tokens ≥ 40 %", "value": value,
                 "met": None if value is None else value >= GOALS["softmax_mfu_4k"]})
    return rows


def suite_markdown(result: dict) -> str:
    sections = result["sections"]
    lines = [f"# Benchmark suite{' (quick, CPU)' if result['quick'] else ''}", "",
             f"- command: `{result['command']}`", f"- date: {result['date']}; commit {result['git']['commit']}",
             f"- device: {result['device']['name']} (torch {result['device']['torch']})",
             f"- budget {result['budget_s']} s, took {result['elapsed_s']} s; dtype {result['plan']['dtype']}; "
             f"compiled with torch.compile (backend {result['plan']['compile_backend']})", ""]
    attention = sections.get("attention", {})
    lines += [f"## Attention cores (softmax through SDPA: {attention.get('sdpa_backend', '?')})", ""]
    rows = []
    for p in attention.get("points", []):
        rows.append([p["variant"] + (" (compiled)" if p["compiled"] else ""), format_tokens(p["n"]),
                     format_ms(p["forward"]["median_s"]), format_ms(p["fwd_bwd"]["median_s"]),
                     "—" if p.get("peak_memory_bytes") is None else f"{p['peak_memory_bytes'] / 2**20:.0f}"])
    lines += [markdown_table(["core", "N", "forward (ms)", "fwd+bwd (ms)", "peak (MiB)"], rows), ""]
    lines += ["## DiT training step", ""]
    rows = [[p["variant"] + (" (compiled)" if p["compiled"] else ""), p["tokens_per_sample"],
             f"{p['step_s'] * 1e3:.0f}", f"{p['tokens_per_s']:.0f}",
             "—" if p["mfu"] is None else f"{100 * p['mfu']:.1f} %",
             "—" if p["peak_memory_mib"] is None else f"{p['peak_memory_mib']:.0f}"]
            for p in sections.get("train", {}).get("points", [])]
    lines += [markdown_table(["attention", "tokens", "step (ms)", "tokens/s", "MFU", "peak (MiB)"], rows), ""]
    lines += ["## Sampling latency per video (DiT only)", ""]
    rows = [[p["variant"] + (" (compiled)" if p["compiled"] else ""), p["tokens_per_sample"], p["steps"],
             f"{p['dit_s']:.2f}"] for p in sections.get("sample", {}).get("points", [])]
    lines += [markdown_table(["attention", "tokens", "steps", "DiT (s)"], rows), ""]
    lines += ["## Goals", ""]
    rows = [[g["goal"], "—" if g["value"] is None else f"{g['value']:.2f}",
             {True: "met", False: "NOT met", None: "not measured"}[g["met"]]] for g in result["goals"]]
    lines += [markdown_table(["goal", "measured", "status"], rows, align="lrl"), ""]
    skipped = [(name, s) for name, section in sections.items() for s in section.get("skipped", [])]
    errors = {name: section["error"] for name, section in sections.items() if section.get("error")}
    if skipped or errors:
        lines += ["## Not measured", ""] + [f"- {name}: {s}" for name, s in skipped]
        lines += [f"- {name}: {error}" for name, error in errors.items()] + [""]
    return "\n".join(lines)


def write_suite_outputs(result: dict, out: Path) -> None:
    write_json(out / "suite.json", result)
    markdown = suite_markdown(result)
    atomic_write_text(out / "suite.md", markdown + "\n")
    series = {}
    for p in result["sections"].get("attention", {}).get("points", []):
        label = p["variant"] + (" compiled" if p["compiled"] else "")
        series.setdefault(label, []).append((p["n"], p["fwd_bwd"]["median_s"], False))
    loglog_plot(out / "suite.png", [("attention cores, forward+backward", series)], xlabel="tokens N",
                ylabel="time (s)", suptitle=f"{result['device']['name']} · {result['git']['commit']} · {result['date']}")
    logger.info("\n" + markdown + f"\nwrote {out / 'suite.json'}, {out / 'suite.md'}, {out / 'suite.png'}")
