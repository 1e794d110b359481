"""Train a video DiT with rectified flow, Hydra configs and Accelerate.

    python train.py                                   # the embedded CPU demo
    python train.py --cfg job                         # print the resolved config
    python train.py model=B attention=hla data=videos data.root=/videos
    python train.py -m attention=softmax,linear,hla,mhla   # a sweep, one run dir each
    accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml train.py model=B ...
    accelerate launch --config_file configs/accelerate/zero2.yaml train.py model=XL ...

The run directory is Hydra's ``hydra.run.dir``. Re-running the same command on the same run
directory resumes from its latest checkpoint (:mod:`dit.train_state`). The data position is
kept in samples and each sample's noise, flow time and label dropout derive from (seed, the
sample's global position) (:func:`dit.flow.training_randomness`), so an interrupted run
resumes to bitwise-identical weights on CPU, and the same global batch gives the same
training whatever the number of processes (docs/scaling.md). What DeepSpeed needs beyond
DDP is in :mod:`dit.deepspeed_glue`.
"""

from __future__ import annotations

import copy
import json
import math
import resource
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from attention import constrain_
from configs.entry import entry_point
from configs.files import atomic_write_text
from configs.logs import get_logger, progress
from configs.processes import end_processes, end_with_launcher, training_accelerator
from data.sampler import SampleStream, sample_stream_loader
from data.training_data import TrainingData
from data.vae import build_vae
from data.video import write_grid_mp4, write_mp4
from dit import deepspeed_glue
from dit.checkpoint import latest_checkpoint
from dit.flow import rectified_flow_loss, training_randomness
from dit.model import VideoDiT, build_dit
from dit.sampling import generate_videos
from dit.train_state import TrainState, check_resume_compatible, load_checkpoint, load_deepspeed_state, write_checkpoint
from eval.fvd import fvd_of_model, load_i3d, training_real_stats
from eval.generation import generation_seed
from eval.metrics import MetricsLogger

logger = get_logger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive NaN/Inf losses."""


# ---------------------------------------------------------------------------------------- helpers


def lr_factor(step: int, train_cfg: DictConfig) -> float:
    """Multiplier of the peak LR at a step: linear warm-up, then constant or cosine to 0."""
    warmup = train_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg.lr_schedule == "cosine":
        progress_done = (step - warmup) / max(1, train_cfg.max_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress_done, 1.0)))
    return 1.0


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA max allocated on GPU, max RSS on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def micro_batch_positions(samples_seen: int, micro: int, rank: int, batch_size: int, world: int) -> range:
    """Global stream positions of one rank's micro-batch (the layout of ``data.sampler.SampleStream``).

    Each micro-step consumes one global batch of world × batch_size positions after the
    ``samples_seen`` of the step's start; rank r reads the r-th slice of it.
    """
    first = samples_seen + (micro * world + rank) * batch_size
    return range(first, first + batch_size)


def check_same_run_dir(run_dir: Path, accelerator: Accelerator) -> None:
    """Fail unless every rank resolved the same run directory (e.g. a time-stamped Hydra sweep dir would not)."""
    if accelerator.num_processes == 1:
        return
    run_dirs = gather_object([str(run_dir.resolve())])
    if len(set(run_dirs)) != 1:
        raise RuntimeError(f"the ranks resolved different run directories {sorted(set(run_dirs))}; pin "
                           f"hydra.run.dir (or hydra.sweep.dir for -m) to one path for all processes")


def model_summary(model: VideoDiT, cfg: DictConfig) -> dict:
    """Parameter count, tokens per sample and forward FLOPs per sample (logged and saved with the run)."""
    flops = 2 * model.macs_per_sample()
    summary = {"parameters": model.num_parameters(), "tokens_per_sample": model.num_tokens,
               "token_grid": list(model.grid), "forward_flops_per_sample": flops, "attention": cfg.attention.name}
    logger.info(f"model {cfg.model.name}: {summary['parameters'] / 1e6:.2f} M parameters | {model.num_tokens} tokens "
                f"per sample (grid {model.grid}) | forward {flops / 1e9:.3f} GFLOPs per sample with "
                f"{cfg.attention.name} attention")
    return summary


@torch.no_grad()
def update_ema(ema: VideoDiT, model: VideoDiT, decay: float, zero_stage: int | None) -> None:
    """ema ← decay·ema + (1 − decay)·model, in fp32, on every rank (ZeRO-3: from gathered weights)."""
    params = list(model.parameters())
    with deepspeed_glue.gathered(params, zero_stage):
        torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in params], 1 - decay)


@torch.no_grad()
def apply_constraints(model: VideoDiT, zero_stage: int | None) -> None:
    """Project constrained parameters (e.g. MHLA's mixing into [0, 1]) wherever the optimizer keeps weights."""
    constrain_(model)  # the module's (ZeRO-1/2: replicated working) copy
    if zero_stage is not None:
        deepspeed_glue.project_masters(model, zero_stage)


def validation_videos(cfg, step, ema, vae, num_classes, fps, run_dir, accelerator, metrics) -> None:
    """EMA samples split across ranks; rank 0 writes them as mp4 files under samples/."""
    count = cfg.train.num_val_samples
    if count == 0:
        return
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    labels = [i % num_classes for i in mine] if num_classes else None
    videos = generate_videos(
        ema, vae.decode, seeds=[generation_seed(cfg.seed, i) for i in mine], labels=labels,
        steps=cfg.train.val_steps, cfg_scale=cfg.train.val_cfg_scale, shift=cfg.train.time_shift,
        batch_size=cfg.train.batch_size, device=accelerator.device,
    )
    pieces = list(zip(mine, videos))
    if accelerator.num_processes > 1:
        pieces = gather_object(pieces)
    if accelerator.is_main_process:
        ordered = [video for _, video in sorted(pieces, key=lambda item: item[0])]
        out = run_dir / "samples" / f"step_{step:08d}"
        for i, video in enumerate(ordered):
            write_mp4(out / f"sample_{i:03d}.mp4", video, fps)
        write_grid_mp4(out / "grid.mp4", ordered, fps)
        metrics.log_video(step, out / "grid.mp4")
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------- main


@entry_point("train")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    end_with_launcher()
    accelerator = training_accelerator(mixed_precision=cfg.train.mixed_precision,
                                       grad_accum_steps=cfg.train.grad_accum_steps)
    check_same_run_dir(run_dir, accelerator)
    zero_stage = deepspeed_glue.configure(accelerator, cfg.train)  # None unless launched with DeepSpeed
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed)

    # VAE, model, then data: every invalid setting fails here, before any training work.
    vae = build_vae(cfg.vae, device=accelerator.device)
    data = TrainingData.of_run(cfg)
    latent_shape = data.latent_shape(vae)
    num_classes = cfg.data.num_classes
    model = build_dit(cfg.model, cfg.attention, in_channels=latent_shape[0], input_size=latent_shape[1:],
                      num_classes=num_classes)
    summary = model_summary(model, cfg)
    dataset = data.dataset()
    ema = copy.deepcopy(model).requires_grad_(False).to(accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "model_summary.json", json.dumps(summary, indent=2))
        if getattr(dataset, "skipped", None):
            dataset.write_skipped_report(run_dir / "skipped_files.txt")
            logger.info(f"skipped {len(dataset.skipped)} unreadable or too-short file(s); see "
                        f"{run_dir / 'skipped_files.txt'}")

    # Resume from the run directory's latest checkpoint, if any.
    state = TrainState()
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        check_resume_compatible(cfg, checkpoint)
        state = load_checkpoint(checkpoint, model, ema, optimizer, scheduler, accelerator, zero_stage)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if checkpoint is not None:
        if zero_stage is not None:
            load_deepspeed_state(model, checkpoint, scheduler)
        logger.info(f"resumed from {checkpoint} (step {state.step}, {state.samples_seen} samples seen)")

    stream = SampleStream(len(dataset), seed=cfg.seed, batch_size=cfg.train.batch_size, rank=rank,
                          world_size=world, start=state.samples_seen)
    batches = iter(sample_stream_loader(dataset, stream, num_workers=cfg.data.num_workers))
    samples_per_step = cfg.train.batch_size * world * cfg.train.grad_accum_steps
    metrics = MetricsLogger(cfg, run_dir, enabled=accelerator.is_main_process)
    fps = data.fps()
    # Optional periodic FVD of the EMA weights; without I3D weights this stops here, before training.
    fvd_i3d = load_i3d(device=accelerator.device) if cfg.train.fvd_every else None
    fvd_real = training_real_stats(cfg, vae, fvd_i3d, accelerator)[0] if fvd_i3d is not None else None

    bar = progress(total=cfg.train.max_steps, initial=state.step, desc="train")
    timer, timed_steps, losses = time.perf_counter(), 0, []
    for step in range(state.step, cfg.train.max_steps):
        # One optimizer step: grad_accum_steps micro-batches, each rank its own slice of the global batch.
        model.train()
        step_losses = []
        for micro in range(cfg.train.grad_accum_steps):
            batch = next(batches)
            x0 = data.clean_latents(batch, vae, accelerator.device)
            positions = micro_batch_positions(state.samples_seen, micro, rank, cfg.train.batch_size, world)
            noise, t, drop = training_randomness(
                cfg.seed, positions, x0.shape[1:], time_mean=cfg.train.time_mean, time_std=cfg.train.time_std,
                time_shift=cfg.train.time_shift, dropout_prob=cfg.model.class_dropout_prob)
            labels = batch["label"].to(accelerator.device) if num_classes else None
            drop = drop.to(accelerator.device) if labels is not None else None
            with accelerator.accumulate(model), deepspeed_glue.autocast(accelerator, cfg.train.mixed_precision,
                                                                         zero_stage):
                loss = rectified_flow_loss(model, x0, noise, t, y=labels, drop_labels=drop)
                accelerator.backward(loss)  # DeepSpeed: also clips and steps at the last micro-step
            step_losses.append(loss.detach())
        loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean")

        # Step unless the loss or the gradient is not finite (DeepSpeed has stepped already: only count it).
        finite = bool(torch.isfinite(loss))
        grad_norm = None
        if zero_stage is not None:
            grad_norm = deepspeed_glue.grad_norm(model)
        elif finite and cfg.train.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        finite = finite and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        if finite:
            optimizer.step()  # a no-op under DeepSpeed
            scheduler.step()
            apply_constraints(raw_model, zero_stage)
            update_ema(ema, raw_model, cfg.train.ema_decay, zero_stage)
            state.consecutive_nonfinite = 0
        else:
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
        optimizer.zero_grad(set_to_none=True)
        state.step, state.samples_seen = step + 1, state.samples_seen + samples_per_step
        if state.consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive non-finite losses/gradients at step {state.step}; "
                f"stopping. The last good checkpoint in {run_dir / 'checkpoints'} is intact. Lower train.lr, "
                f"enable train.grad_clip, or use train.mixed_precision=bf16 instead of fp16."
            )

        # Progress, metrics, checkpoints, validation videos, FVD.
        if finite:
            losses.append(loss.item())
        timed_steps += 1
        elapsed = time.perf_counter() - timer
        rates = {"steps_per_s": timed_steps / elapsed, "samples_per_s": timed_steps * samples_per_step / elapsed,
                 "tokens_per_s": timed_steps * samples_per_step * raw_model.num_tokens / elapsed}
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **{k.replace("_per_s", "/s"): f"{v:.2f}" for k, v in rates.items()})
        last = state.step == cfg.train.max_steps
        if state.step % cfg.train.log_every == 0 or last:
            record = {"loss": float(np.mean(losses)) if losses else float("nan"), "lr": scheduler.get_last_lr()[0],
                      "skipped_steps": state.skipped_steps, "samples_seen": state.samples_seen,
                      "peak_memory_gb": peak_memory_gb(accelerator.device), **rates}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.log(state.step, record)
            losses = []
        # While losses are non-finite, keep the last good checkpoint as the newest one.
        if (state.step % cfg.train.checkpoint_every == 0 and state.consecutive_nonfinite == 0) or last:
            write_checkpoint(run_dir, cfg, state, model, ema, optimizer, scheduler, accelerator, zero_stage)
        if (cfg.train.sample_every and state.step % cfg.train.sample_every == 0) or last:
            validation_videos(cfg, state.step, ema, vae, num_classes, fps, run_dir, accelerator, metrics)
        if cfg.train.fvd_every and state.step % cfg.train.fvd_every == 0:
            fvd = fvd_of_model(ema, vae.decode, cfg, num_samples=cfg.train.fvd_num_samples, steps=cfg.train.val_steps,
                               cfg_scale=cfg.train.val_cfg_scale, seed=cfg.seed, i3d=fvd_i3d, real_stats=fvd_real,
                               state=accelerator, batch_size=cfg.train.batch_size)
            metrics.log(state.step, {f"fvd{cfg.train.fvd_num_samples}": fvd})
    bar.close()
    metrics.close()
    logger.info(f"done: {state.step} steps; checkpoints in {run_dir / 'checkpoints'}, videos in {run_dir / 'samples'}")
    # Drop every reference to wrapped objects before tearing down the process group.
    del model, optimizer, raw_model, batches
    end_processes(accelerator)


if __name__ == "__main__":
    main()
