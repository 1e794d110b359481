"""Training-step and sampling benchmarks of the real video DiT (``python -m eval.throughput train|sample``).

train: one optimizer step (forward, rectified-flow loss, backward, AdamW, MHLA clamp) of
the DiT built from ``configs/model/<model>.yaml`` and ``configs/attention/<variant>.yaml``
on random latents of each requested size, timed after warm-up with the device
synchronised at the timer boundaries; data loading and VAE encoding are outside the timer
(as with pre-extracted latents). Reported per device: samples/s, latent tokens/s, model
FLOPs/s and MFU (training FLOPs = 3 × forward FLOPs, each variant's own attention FLOPs,
recomputation not counted; MFU only where the device's dense peak is known or given with
--peak-tflops) and peak memory. Every point runs in a fresh process so CPU peak RSS is honest.

sample: latency of one video at batch 1: ``steps`` DiT evaluations of the Euler sampler,
the VAE decode, and the total.
"""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import torch

from configs.schema import validate_train_config
from dit.flow import euler_sample, rectified_flow_loss
from dit.model import build_dit

from .throughput import (
    DTYPES,
    PeakMemory,
    REPO_ROOT,
    default_out_dir,
    device_info,
    git_state,
    load_average,
    loglog_plot,
    markdown_table,
    resolve_device,
    time_calls,
    utc_now,
    write_json,
)

VARIANTS = ("softmax", "linear", "hla", "mhla")
# Dense bf16 peaks (FLOP/s) of devices we know; MFU is reported only for these or --peak-tflops.
DENSE_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_PEAK_FLOPS.items() if key in name), None)


def compose_run_config(model: str, attention: str):
    """The resolved train config for a model size and attention variant (the shipped YAML files)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", f"attention={attention}"])
    validate_train_config(cfg)
    return cfg


def build_model(spec: dict, device: torch.device):
    cfg = compose_run_config(spec["model"], spec["variant"])
    latent_shape = (spec["channels"], spec["frames"], spec["size"], spec["size"])
    model_cfg = dict(cfg.model)
    model_cfg["gradient_checkpointing"] = spec.get("gradient_checkpointing", False)
    model = build_dit(model_cfg, cfg.attention, in_channels=latent_shape[0], input_size=latent_shape[1:],
                      num_classes=0).to(device)
    return model, cfg, latent_shape


def measure_train_point(spec: dict) -> dict:
    """One (variant, latent size) training-step measurement. Runs in its own process."""
    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model, cfg, latent_shape = build_model(spec, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randn(spec["batch"], *latent_shape, device=device)
    generator = torch.Generator().manual_seed(0)
    dtype = DTYPES[spec["dtype"]]

    def train_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = rectified_flow_loss(model, x0, labels=None, drop_labels=None, time_mean=0.0, time_std=1.0,
                                       time_shift=1.0, generator=generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.clamp_mixing_()

    with PeakMemory(device) as memory:
        timing = time_calls(train_step, device, warmup=spec["warmup"], repeats=spec["steps"], budget_s=spec["budget_s"])
    samples_per_s = spec["batch"] / timing["median_s"]
    forward_flops = 2 * model.macs_per_sample()
    achieved = 3 * forward_flops * samples_per_s
    peak = spec.get("peak_flops")
    return {
        **spec,
        "tokens_per_sample": model.num_tokens,
        "token_grid": list(model.grid),
        "parameters": model.num_parameters(),
        "forward_flops_per_sample": forward_flops,
        "step_s": timing["median_s"],
        "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * model.num_tokens,
        "achieved_gflops": achieved / 1e9,
        "mfu": achieved / peak if peak else None,
        "peak_memory_mib": memory.peak_bytes / 2**20 if memory.peak_bytes is not None else None,
        "memory_method": memory.method,
        "over_budget": timing["over_budget"],
    }


def measure_sample_point(spec: dict) -> dict:
    """Sampling latency of one video (batch 1) for one variant. Runs in its own process."""
    from data.vae import build_vae

    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    model, cfg, latent_shape = build_model(spec, device)
    model.eval()
    vae = build_vae(cfg.vae, device=device)
    noise = torch.randn(1, *latent_shape, device=device)
    dtype = DTYPES[spec["dtype"]]
    timings = {}

    def sample() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            timings["latents"] = euler_sample(lambda x, t: model(x, t), noise, steps=spec["steps"], shift=1.0)

    def decode() -> None:
        with torch.no_grad():
            vae.decode(timings["latents"].float())

    dit = time_calls(sample, device, warmup=1, repeats=spec["repeats"])
    vae_time = time_calls(decode, device, warmup=1, repeats=spec["repeats"])
    return {
        **spec,
        "vae": cfg.vae.name,
        "tokens_per_sample": model.num_tokens,
        "dit_s": dit["median_s"],
        "dit_per_step_s": dit["median_s"] / spec["steps"],
        "vae_decode_s": vae_time["median_s"],
        "total_s": dit["median_s"] + vae_time["median_s"],
    }


def in_fresh_process(fn, spec: dict) -> dict:
    """Run ``fn(spec)`` in a new interpreter (honest peak RSS, no allocator state carried over)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (spec,))


def _header(args: argparse.Namespace, device: torch.device) -> dict:
    return {"date": utc_now(), "device": device_info(device), "git": git_state(), "load_average": load_average(),
            "argv": getattr(args, "argv", None)}


def _settings_line(result: dict) -> str:
    d = result["device"]
    return (f"Device: {d.get('name')} ({d.get('type')}, torch {d.get('torch')}) · "
            f"commit {result['git']['commit']} · {result['date']} · load average at start {result['load_average']}")


def run_train(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    peak = device_peak_flops(device, args.peak_tflops)
    result = {**_header(args, device), "benchmark": "train", "points": [],
              "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv", "out")},
              "peak_flops": peak}
    for variant in args.variants:
        stopped = False
        for size in args.sizes:
            if stopped:
                break
            spec = {"model": args.model, "variant": variant, "frames": args.frames, "size": size,
                    "channels": args.channels, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                    "dtype": args.dtype, "device": str(device), "budget_s": args.budget_s, "threads": args.threads,
                    "peak_flops": peak, "gradient_checkpointing": args.gradient_checkpointing}
            point = in_fresh_process(measure_train_point, spec)
            result["points"].append(point)
            print(f"{variant:8s} {point['tokens_per_sample']:6d} tokens: {point['samples_per_s']:.3f} samples/s, "
                  f"{point['tokens_per_s']:.0f} tokens/s, step {point['step_s'] * 1e3:.0f} ms", flush=True)
            stopped = point["over_budget"]
    write_train_outputs(result, args.out or default_out_dir("train", device))
    return result


def write_train_outputs(result: dict, out: Path) -> None:
    s = result["settings"]
    rows = [
        [p["variant"], p["tokens_per_sample"], "×".join(map(str, p["token_grid"])), f"{p['step_s'] * 1e3:.0f}",
         f"{p['samples_per_s']:.3f}", f"{p['tokens_per_s']:.0f}", f"{p['forward_flops_per_sample'] / 1e9:.2f}",
         f"{p['achieved_gflops']:.2f}", "—" if p["mfu"] is None else f"{100 * p['mfu']:.1f} %",
         "—" if p["peak_memory_mib"] is None else f"{p['peak_memory_mib']:.0f}"]
        for p in result["points"]
    ]
    table = markdown_table(["attention", "tokens", "grid", "step (ms)", "samples/s", "tokens/s", "fwd GFLOPs/sample",
                            "model GFLOP/s", "MFU", "peak mem (MiB)"], rows)
    text = "\n\n".join([
        f"### Training step: model={s['model']}, batch {s['batch']} per device, {s['dtype']}, "
        f"{s['frames']}-frame latents with {s['channels']} channels",
        _settings_line(result),
        table,
        "Median of the timed steps after warm-up; random latents (no data loading or VAE in the timer); "
        "training FLOPs = 3 × forward FLOPs of each variant; peak memory: "
        + (result["points"][0]["memory_method"] if result["points"] else "n/a") + ".",
    ])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train.json", result)
    (out / "train.md").write_text(text + "\n")
    series = {v: [(p["tokens_per_sample"], p["tokens_per_s"], p["over_budget"]) for p in result["points"]
                  if p["variant"] == v] for v in s["variants"]}
    loglog_plot(out / "train.png", [(f"training tokens/s, model={s['model']}", series)], xlabel="tokens per sample",
                ylabel="tokens/s", suptitle=_settings_line(result), guides=())
    print("\n" + text + f"\n\nwrote {out / 'train.json'}, {out / 'train.md'}, {out / 'train.png'}")


def run_sample(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    result = {**_header(args, device), "benchmark": "sample", "points": [],
              "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv", "out")}}
    for variant in args.variants:
        spec = {"model": args.model, "variant": variant, "frames": args.frames, "size": args.size,
                "channels": args.channels, "steps": args.steps, "repeats": args.repeats, "dtype": args.dtype,
                "device": str(device)}
        point = in_fresh_process(measure_sample_point, spec)
        result["points"].append(point)
        print(f"{variant:8s}: {point['total_s']:.2f} s per video", flush=True)
    s = result["settings"]
    rows = [[p["variant"], p["tokens_per_sample"], p["steps"], f"{p['dit_per_step_s'] * 1e3:.1f}",
             f"{p['dit_s']:.2f}", f"{p['vae_decode_s'] * 1e3:.1f}", f"{p['total_s']:.2f}"] for p in result["points"]]
    text = "\n\n".join([
        f"### Sampling latency: model={s['model']}, one video (batch 1), {s['frames']}×{s['size']}² latents, "
        f"{s['steps']} Euler steps, {s['dtype']}, VAE {result['points'][0]['vae'] if result['points'] else '?'}",
        _settings_line(result),
        markdown_table(["attention", "tokens", "steps", "DiT per step (ms)", "DiT total (s)", "VAE decode (ms)",
                        "total (s)"], rows),
    ])
    out = args.out or default_out_dir("sample", device)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sample.json", result)
    (out / "sample.md").write_text(text + "\n")
    print("\n" + text + f"\n\nwrote {out / 'sample.json'}, {out / 'sample.md'}")
    return result


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training-step throughput, MFU and memory of the DiT per attention variant",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="S", help="configs/model/<name>.yaml")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--frames", type=int, default=16, help="latent frames")
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="latent height = width")
    p.add_argument("--channels", type=int, default=4, help="latent channels")
    p.add_argument("--batch", type=int, default=1, help="samples per device")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="autocast dtype")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--budget-s", type=float, default=60.0, help="stop a variant once one step takes longer")
    p.add_argument("--peak-tflops", type=float, default=None, help="device dense peak for MFU (default: known GPUs)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run_train)


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sampling latency per video (batch 1): DiT steps, VAE decode, total",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, help="3 with the default identity VAE")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=run_sample)
