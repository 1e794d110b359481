"""Training-step and sampling benchmarks of the real video DiT (``python -m eval.throughput train|sample``).

train: one optimizer step (forward, rectified-flow loss, backward, AdamW, MHLA clamp) of
the DiT built from ``configs/model/<model>.yaml`` and ``configs/attention/<variant>.yaml``
on random latents of each requested size, timed after warm-up with the device
synchronised at the timer boundaries; data loading and VAE encoding are outside the timer
(as with pre-extracted latents). Reported per device: samples/s, latent tokens/s, model
FLOPs/s and MFU (training FLOPs = 3 × forward FLOPs, each variant's own attention FLOPs,
recomputation not counted; MFU only where the device's dense peak is known or given with
``peak_tflops``) and peak memory. Every point runs in a fresh process so CPU peak RSS is honest.

sample: latency of one video at batch 1: ``steps`` DiT evaluations of the Euler sampler,
the VAE decode, and the total.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from attention import constrain_
from configs.entry import compose_config
from configs.files import atomic_write_text
from configs.logs import get_logger
from data.training_data import TrainingData
from dit.flow import draw_noise_and_time, euler_sample, rectified_flow_loss
from dit.model import build_dit
from eval.benchmark import (
    DTYPES,
    PeakMemory,
    default_out_dir,
    in_fresh_process,
    loglog_plot,
    markdown_table,
    resolve_device,
    run_header,
    time_calls,
    write_json,
)

logger = get_logger(__name__)
# Dense bf16 peaks (FLOP/s) of devices we know; MFU is reported only for these or --peak-tflops.
DENSE_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def device_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DENSE_PEAK_FLOPS.items() if key in name), None)


def build_model(spec: dict, device: torch.device):
    """The DiT of the spec's model config and ``attention=<spec.variant>`` (shipped configs), for random latents.

    Returns (model on ``device``, the composed train config, latent shape (C, T, H, W)).
    """
    cfg = compose_config("train", [f"attention={spec['variant']}"])
    height, width = spec.get("height") or spec["size"], spec.get("width") or spec["size"]
    latent_shape = (spec["channels"], spec["frames"], height, width)
    model = build_dit(spec["model"], cfg.attention, in_channels=latent_shape[0], input_size=latent_shape[1:],
                      num_classes=0).to(device)
    if spec.get("compile"):  # a torch.compile backend name
        torch._dynamo.reset()  # a new model: no recompilation limit across the models of one process
        model.compile_blocks(backend=spec["compile"])
    return model, cfg, latent_shape


def measure_train_point(spec: dict) -> dict:
    """One (variant, latent size) training-step measurement. Runs in its own process.

    ``spec``: model (a model config node), variant, channels, frames, size (or height and
    width), batch, steps, warmup, dtype, device, budget_s, threads, peak_flops, compile.
    """
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
        noise, t = draw_noise_and_time(x0.shape, generator, time_mean=0.0, time_std=1.0, time_shift=1.0)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = rectified_flow_loss(model, x0, noise, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        constrain_(model)

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
    torch.manual_seed(0)
    device = resolve_device(spec["device"])
    model, cfg, latent_shape = build_model(spec, device)
    model.eval()
    training_data = TrainingData.of_run(cfg)
    vae = training_data.build_vae(device)
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
        "vae": training_data.vae_config()["name"],
        "tokens_per_sample": model.num_tokens,
        "dit_s": dit["median_s"],
        "dit_per_step_s": dit["median_s"] / spec["steps"],
        "vae_decode_s": vae_time["median_s"],
        "total_s": dit["median_s"] + vae_time["median_s"],
    }


def _settings_line(result: dict) -> str:
    d = result["device"]
    return (f"Device: {d.get('name')} ({d.get('type')}, torch {d.get('torch')}) · "
            f"commit {result['git']['commit']} · {result['date']} · load average at start "
            f"{result['load_average']['before']}")


def _settings(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "out"}


def run_train(cfg: DictConfig, command: str) -> dict:
    """Measure every (variant, latent size) of a ``train`` benchmark config; write and return the result."""
    device = resolve_device(cfg.device)
    peak = device_peak_flops(device, cfg.peak_tflops)
    settings = _settings(cfg)
    result = {"benchmark": "train", **run_header(device, command), "points": [], "settings": settings,
              "peak_flops": peak}
    for variant in cfg.variants:
        stopped = False
        for size in cfg.sizes:
            if stopped:
                break
            spec = {"model": settings["model"], "variant": variant, "frames": cfg.frames, "size": size,
                    "channels": cfg.channels, "batch": cfg.batch, "steps": cfg.steps, "warmup": cfg.warmup,
                    "dtype": cfg.dtype, "device": str(device), "budget_s": cfg.budget_s, "threads": cfg.threads,
                    "peak_flops": peak}
            point = in_fresh_process("eval.dit_benchmark:measure_train_point", spec)
            result["points"].append(point)
            logger.info(f"{variant:8s} {point['tokens_per_sample']:6d} tokens: {point['samples_per_s']:.3f} "
                        f"samples/s, {point['tokens_per_s']:.0f} tokens/s, step {point['step_s'] * 1e3:.0f} ms")
            stopped = point["over_budget"]
    write_train_outputs(result, Path(cfg.out) if cfg.out else default_out_dir("train", device))
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
        f"### Training step: model={s['model']['name']}, batch {s['batch']} per device, {s['dtype']}, "
        f"{s['frames']}-frame latents with {s['channels']} channels",
        _settings_line(result),
        table,
        "Median of the timed steps after warm-up; random latents (no data loading or VAE in the timer); "
        "training FLOPs = 3 × forward FLOPs of each variant; peak memory: "
        + (result["points"][0]["memory_method"] if result["points"] else "n/a") + ".",
    ])
    write_json(out / "train.json", result)
    atomic_write_text(out / "train.md", text + "\n")
    series = {v: [(p["tokens_per_sample"], p["tokens_per_s"], p["over_budget"]) for p in result["points"]
                  if p["variant"] == v] for v in s["variants"]}
    loglog_plot(out / "train.png", [(f"training tokens/s, model={s['model']['name']}", series)], xlabel="tokens per sample",
                ylabel="tokens/s", suptitle=_settings_line(result), guides=())
    logger.info("\n" + text + f"\n\nwrote {out / 'train.json'}, {out / 'train.md'}, {out / 'train.png'}")


def run_sample(cfg: DictConfig, command: str) -> dict:
    """Measure the sampling latency of every variant of a ``sample`` benchmark config; write and return it."""
    device = resolve_device(cfg.device)
    settings = _settings(cfg)
    result = {"benchmark": "sample", **run_header(device, command), "points": [], "settings": settings}
    for variant in cfg.variants:
        spec = {"model": settings["model"], "variant": variant, "frames": cfg.frames, "size": cfg.size,
                "channels": cfg.channels, "steps": cfg.steps, "repeats": cfg.repeats, "dtype": cfg.dtype,
                "device": str(device)}
        point = in_fresh_process("eval.dit_benchmark:measure_sample_point", spec)
        result["points"].append(point)
        logger.info(f"{variant:8s}: {point['total_s']:.2f} s per video")
    s = result["settings"]
    rows = [[p["variant"], p["tokens_per_sample"], p["steps"], f"{p['dit_per_step_s'] * 1e3:.1f}",
             f"{p['dit_s']:.2f}", f"{p['vae_decode_s'] * 1e3:.1f}", f"{p['total_s']:.2f}"] for p in result["points"]]
    text = "\n\n".join([
        f"### Sampling latency: model={s['model']['name']}, one video (batch 1), {s['frames']}×{s['size']}² latents, "
        f"{s['steps']} Euler steps, {s['dtype']}, VAE {result['points'][0]['vae'] if result['points'] else '?'}",
        _settings_line(result),
        markdown_table(["attention", "tokens", "steps", "DiT per step (ms)", "DiT total (s)", "VAE decode (ms)",
                        "total (s)"], rows),
    ])
    out = Path(cfg.out) if cfg.out else default_out_dir("sample", device)
    write_json(out / "sample.json", result)
    atomic_write_text(out / "sample.md", text + "\n")
    logger.info("\n" + text + f"\n\nwrote {out / 'sample.json'}, {out / 'sample.md'}")
    return result
