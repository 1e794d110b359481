"""Op-level cost of each attention core vs the number of tokens N (``python -m eval.throughput attention``).

Forward and forward+backward time, peak memory, the spec's FLOP count, the fitted exponent
of time vs N and the speedup over softmax, for the cores of the registry's variants; each
core runs on realistic inputs built through the variant's own layer. Writes
``attention.json`` (raw numbers), ``attention.md`` (tables) and ``attention.png`` (log-log
plot); ``from_json=<file>`` rebuilds the tables and the plot from a saved ``attention.json``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from attention import VARIANTS, build_attention_core
from configs.entry import compose_config
from configs.logs import get_logger
from eval.attention_report import write_attention_outputs
from eval.benchmark import (
    DTYPES,
    MIB,
    REPO_ROOT,
    PeakMemory,
    default_out_dir,
    format_ms,
    git_state,
    in_fresh_process,
    load_average,
    resolve_device,
    run_header,
    time_calls,
)

logger = get_logger(__name__)

# hla_form=both compares the two Kronecker forms; all adds the symmetric form of tied factors.
HLA_FORM_CHOICES = {"both": ("state", "value_modulation"), "all": ("symmetric", "state", "value_modulation")}
# The code whose uncommitted changes the report lists next to the commit.
_WATCHED_PATHS = ("attention", "eval/attention_benchmark.py", "eval/attention_report.py", "eval/benchmark.py",
                  "configs/attention")


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
    """The shipped config node of a variant (``attention=<variant>`` of the train config) plus overrides."""
    node = OmegaConf.to_container(compose_config("train", [f"attention={variant}"]).attention, resolve=True)
    node.update(overrides or {})
    return node


@dataclass
class AttentionCase:
    """One attention core on concrete inputs: ``call()`` runs ``fn(*args)``; ``leaves`` get gradients."""

    label: str
    fn: Callable[..., Tensor]
    args: tuple[Tensor, ...]
    leaves: list[Tensor]
    flops: int  # forward FLOPs of the core (2 x the core's core_macs), whole batch
    info: dict = field(default_factory=dict)

    def call(self) -> Tensor:
        return self.fn(*self.args)


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
    hla_form: str = "auto",
    seed: int = 0,
    compile_backend: str | None = None,
) -> AttentionCase:
    """Realistic core inputs for a variant, built through the variant's own core.

    The core (from the shipped config, :func:`attention.build_attention_core`) supplies the
    settings, the inputs of its functional core (``core_inputs``: features, HLA's Taylor or
    learned factors, MHLA's blocks for the auto layout on :func:`token_grid` (N)) and the FLOP
    count (``core_macs``). q and k are RMS-normalised randn as after the layers' q/k RMSNorm,
    v is randn. The leaves are what the functional core sees (and MHLA's mixing matrix): the
    inputs are detached, so forward+backward times the core only (no projections, feature
    maps, RoPE or output RMSNorm). ``compile_backend``: run it through ``torch.compile``.
    """
    device = torch.device(device)
    if variant not in VARIANTS:
        raise ValueError(f"unknown attention variant {variant!r}; choose from {list(VARIANTS)}")
    overrides = {}
    if variant == "hla":
        overrides["form"] = hla_form
        if hla_order is not None:
            overrides["order"] = hla_order
        if hla_rank is not None:
            overrides["rank"] = hla_rank or None  # 0 -> null: W = identity
    grid = token_grid(num_tokens)
    torch.manual_seed(seed)
    core = build_attention_core(attention_config(variant, overrides), dim=heads * head_dim, num_heads=heads,
                                grid=grid).to(device)
    shape = (batch, heads, num_tokens, head_dim)
    with torch.no_grad():
        inputs = core.core_inputs(_rms_normed(shape, device), _rms_normed(shape, device), grid)
        v = torch.randn(shape, device=device)
    args = tuple(t.to(dtype).requires_grad_() for t in (*inputs, v))
    leaves = [*args, core.mixing] if variant == "mhla" else list(args)  # the mixing matrix is learnt: it gets a gradient

    def fn(*tensors: Tensor) -> Tensor:
        return core.core(tensors[:-1], tensors[-1], grid)

    info: dict = {"grid": list(grid)}
    label = variant
    if variant in ("linear", "mhla"):
        info["normalize"] = core.normalize
    if variant == "mhla":
        info.update(layout=list(core.layout), blocks=math.prod(core.layout))
    if variant == "hla":
        label = f"hla[{core.form}]"
        info.update(order=core.order, factors=core.factors, rank=core.rank, factor_width=core.factor_rank,
                    kronecker_rank=core.factor_rank**core.order, feature_dim=core.feature_dim, form=core.form,
                    normalize=core.normalize)
    if compile_backend:
        torch._dynamo.reset()  # every case is a new graph: no recompilation limit across cases
        fn = torch.compile(fn, backend=compile_backend, fullgraph=True)
        info["compiled"] = compile_backend
    return AttentionCase(label=label, fn=fn, args=args, leaves=leaves, flops=2 * batch * core.core_macs(grid),
                         info=info)


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
        hla_form=spec.get("hla_form", "auto"),
        compile_backend=spec.get("compile"),
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


def attention_labels(variants: Sequence[str], hla_form: str) -> list[tuple[str, str | None]]:
    """(variant, hla form) pairs to measure, in order; 'both' / 'all' measure HLA in several forms."""
    pairs: list[tuple[str, str | None]] = []
    for variant in variants:
        if variant == "hla":
            pairs += [("hla", form) for form in HLA_FORM_CHOICES.get(hla_form, (hla_form,))]
        else:
            pairs.append((variant, None))
    return pairs


def _progress_line(point: dict, elapsed_s: float) -> str:
    def timing(mode: str) -> str:
        return f"{format_ms(point[mode]['median_s']):>8} ms{'†' if point[mode]['over_budget'] else ' '}"

    mem = point["peak_memory_bytes"]
    return (
        f"  {point['label']:<22} N={point['n']:>7}  forward {timing('forward')}  fwd+bwd {timing('fwd_bwd')}  "
        f"peak {'—' if mem is None else f'{mem / MIB:.1f} MiB'}  [{elapsed_s:.0f} s]"
    )


def run_attention(cfg: DictConfig, command: str) -> dict:
    """Measure every (variant, N) of an ``attention`` benchmark config; write and return the result."""
    if cfg.from_json is not None:
        path = Path(cfg.from_json)
        result = json.loads(path.read_text())
        write_attention_outputs(result, Path(cfg.out) if cfg.out else path.parent)
        return result
    unknown = sorted(set(cfg.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"variants={list(cfg.variants)}: {unknown} are not attention cores; "
                         f"choose from {list(VARIANTS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    isolation = cfg.isolation if cfg.isolation != "auto" else ("subprocess" if device.type == "cpu" else "inprocess")
    out_dir = Path(cfg.out) if cfg.out else default_out_dir("attention", device)
    tokens = sorted(set(cfg.tokens))
    # Settings the cores resolve from the configs (HLA ranks and form, normalisation), for the report.
    probe_n = tokens[0]
    hla_info = {}
    if "hla" in cfg.variants:
        hla_info = build_attention_case("hla", probe_n, batch=1, heads=1, head_dim=cfg.head_dim,
                                        hla_order=cfg.hla_order, hla_rank=cfg.hla_rank,
                                        hla_form="auto" if cfg.hla_form in HLA_FORM_CHOICES else cfg.hla_form).info
    pairs = [(variant, hla_info["form"] if form == "auto" else form)
             for variant, form in attention_labels(cfg.variants, cfg.hla_form)]
    labels = [variant if form is None else f"hla[{form}]" for variant, form in pairs]
    settings = {
        "tokens": tokens,
        "batch": cfg.batch,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "dtype": cfg.dtype,
        "variants": list(cfg.variants),
        "hla_form": cfg.hla_form,
        "hla": {key: hla_info.get(key) for key in ("order", "rank", "factor_width", "kronecker_rank", "feature_dim",
                                                    "factors", "form", "normalize")},
        "compile": cfg.compile,
        "linear_normalize": attention_config("linear").get("normalize"),
        "mhla_normalize": attention_config("mhla").get("normalize"),
        "budget_s": cfg.budget_s,
        "repeats": cfg.repeats,
        "warmup": cfg.warmup,
        "fit_window": list(cfg.fit_window),
        "isolation": isolation,
        "seed": cfg.seed,
        "threads": torch.get_num_threads(),
    }
    result = {
        "benchmark": "attention",
        **run_header(device, command, watch=_WATCHED_PATHS),
        "settings": settings,
        "labels": labels,
        "points": [],
        "skipped": {label: [] for label in labels},
        "errors": {},
    }
    logger.info(f"attention benchmark on {result['device']['name']}, torch {torch.__version__}, "
                f"git {result['git']['commit']}, {result['date']}")
    logger.info("settings: " + json.dumps({k: v for k, v in settings.items() if k != "tokens"}))
    logger.info(f"tokens: {tokens}\n")

    started = time.perf_counter()
    for (variant, form), label in zip(pairs, labels):
        for i, n in enumerate(tokens):
            spec = {
                "variant": variant, "n": n, "batch": cfg.batch, "heads": cfg.heads, "head_dim": cfg.head_dim,
                "dtype": cfg.dtype, "device": str(device), "hla_order": cfg.hla_order, "hla_rank": cfg.hla_rank,
                "hla_form": form or "auto", "compile": cfg.compile, "seed": cfg.seed, "warmup": cfg.warmup, "repeats": cfg.repeats,
                "budget_s": cfg.budget_s, "threads": torch.get_num_threads(),
            }
            try:
                point = (in_fresh_process("eval.attention_benchmark:measure_attention_point", spec)
                         if isolation == "subprocess" else measure_attention_point(spec))
            except (RuntimeError, torch.OutOfMemoryError) as exc:  # OOM or a failed subprocess
                result["errors"][label] = f"N={n}: {exc}"
                result["skipped"][label] = tokens[i:]
                logger.info(f"  {label:<22} N={n:>7}  FAILED: {exc}; skipping larger N")
                break
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result["points"].append(point)
            logger.info(_progress_line(point, time.perf_counter() - started))
            if point["fwd_bwd"]["over_budget"]:
                result["skipped"][label] = tokens[i + 1 :]
                if tokens[i + 1 :]:
                    logger.info(f"  {label}: a forward+backward call exceeded {cfg.budget_s:g} s; skipping N = "
                                f"{tokens[i + 1:]}")
                break
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    # Subprocess points import the code afresh: say so if it changed while we measured.
    result["git_end"] = git_state(REPO_ROOT, watch=_WATCHED_PATHS)
    result["load_average"]["after"] = load_average()
    write_attention_outputs(result, out_dir)
    return result


