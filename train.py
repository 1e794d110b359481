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
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from attention import constrain_
from configs.entry import entry_point
from configs.files import atomic_write_text
from configs.logs import get_logger, progress
from configs.processes import end_processes, end_with_launcher, training_accelerator
from data.sampler import SampleStream, sample_stream_loader
from data.training_data import TrainingData
from data.video import write_grid_mp4, write_mp4
from dit import deepspeed_glue
from dit.checkpoint import latest_checkpoint, load_state_dict, resolve_checkpoint
from dit.families import model_family, take, trainable_parameters
from dit.flow import noisy_latents, rectified_flow_loss, training_randomness
from dit.train_state import (
    TrainState,
    check_resume_compatible,
    load_checkpoint,
    load_deepspeed_state,
    write_checkpoint,
)
from eval.demo_score import headline, is_demo_run, load_demo_classifier, score_model
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


def log_summary(summary: dict, cfg: DictConfig) -> None:
    flops = summary.get("forward_flops_per_sample")
    logger.info(f"model {cfg.model.name}: {summary['parameters'] / 1e6:.2f} M parameters | "
                f"{summary['tokens_per_sample']} tokens per sample (grid {tuple(summary['token_grid'])})"
                + (f" | forward {flops / 1e9:.3f} GFLOPs per sample" if flops else "")
                + f" with {cfg.attention.name} attention")


def initial_weights(model: nn.Module, source: str) -> None:
    """``train.init_from``: another run's (or checkpoint's) raw weights, loaded before training (weights only)."""
    checkpoint = resolve_checkpoint(source)
    model.load_state_dict(load_state_dict(checkpoint / "model.safetensors"))
    logger.info(f"initial weights from {checkpoint} (a new optimizer, step 0)")


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, zero_stage: int | None) -> None:
    """ema ← decay·ema + (1 − decay)·model, in fp32, on every rank (ZeRO-3: from gathered weights)."""
    params = list(model.parameters())
    with deepspeed_glue.gathered(params, zero_stage):
        torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in params], 1 - decay)


@torch.no_grad()
def apply_constraints(model: nn.Module, zero_stage: int | None) -> None:
    """Project constrained parameters (e.g. MHLA's mixing into [0, 1]) wherever the optimizer keeps weights."""
    constrain_(model)  # the module's (ZeRO-1/2: replicated working) copy
    if zero_stage is not None:
        deepspeed_glue.project_masters(model, zero_stage)


def validation_videos(cfg, step, family, ema, vae, conditions, latent_shape, fps, run_dir, accelerator,
                      metrics) -> None:
    """EMA samples (conditioned on ``conditions``) split across ranks; rank 0 writes them under samples/."""
    count = cfg.train.num_val_samples
    if count == 0:
        return
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    videos = family.generate(
        ema, vae.decode, take(conditions, mine), seeds=[generation_seed(cfg.seed, i) for i in mine],
        latent_shape=latent_shape, steps=cfg.train.val_steps, cfg_scale=cfg.train.val_cfg_scale,
        shift=cfg.train.time_shift, batch_size=cfg.train.batch_size, device=accelerator.device,
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
    data = TrainingData.of_run(cfg)
    vae = data.build_vae(accelerator.device)
    latent_shape = data.latent_shape(vae)
    family = model_family(cfg)
    family.check(data.has_captions())
    if cfg.train.score_every and not is_demo_run(cfg):
        raise ValueError(f"train.score_every scores the demo's shapes, but this run trains on data={cfg.data.name}: "
                         "set train.score_every=0 (and use train.fvd_every or eval.fvd)")
    family.prepare_config(latent_shape)
    model = family.build(latent_shape)
    dataset = data.dataset()
    if data.has_captions():
        family.empty_caption = dataset.empty_caption()
    if cfg.train.init_from:
        initial_weights(model, cfg.train.init_from)
    summary = {**family.summary(model, latent_shape), "attention": cfg.attention.name}
    log_summary(summary, cfg)
    ema = copy.deepcopy(model).requires_grad_(False).to(accelerator.device) if cfg.train.ema else model
    if cfg.train.compile:  # the blocks, in place: weights, checkpoints and resume are as in eager mode
        family.compile(model)
        if cfg.train.ema:
            family.compile(ema)
    optimizer = torch.optim.AdamW(trainable_parameters(family, model, cfg.train), lr=cfg.train.lr,
                                  betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)
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
    elif cfg.train.init_from:
        ema.load_state_dict(model.state_dict())
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
    val_conditions = family.validation_conditions(dataset, cfg.train.num_val_samples)
    tokens_per_sample = summary["tokens_per_sample"]
    # Optional periodic FVD of the EMA weights; without I3D weights this stops here, before training.
    fvd_i3d = load_i3d(device=accelerator.device) if cfg.train.fvd_every else None
    fvd_real = training_real_stats(cfg, vae, fvd_i3d, accelerator)[0] if fvd_i3d is not None else None
    # Optional periodic demo score (every rank generates the same clips: correct under any sharding).
    score_classifier, score_record = load_demo_classifier(cfg.data) if cfg.train.score_every else (None, None)

    bar = progress(total=cfg.train.max_steps, initial=state.step, desc="train")
    timer, timed_steps, losses = time.perf_counter(), 0, []
    for step in range(state.step, cfg.train.max_steps):
        # One optimizer step: grad_accum_steps micro-batches, each rank its own slice of the global batch.
        step_started = time.perf_counter()
        model.train()
        step_losses, block_losses = [], {}
        for micro in range(cfg.train.grad_accum_steps):
            batch = next(batches)
            x0 = data.clean_latents(batch, vae, accelerator.device)
            positions = micro_batch_positions(state.samples_seen, micro, rank, cfg.train.batch_size, world)
            noise, t, drop = training_randomness(
                cfg.seed, positions, x0.shape[1:], time_mean=cfg.train.time_mean, time_std=cfg.train.time_std,
                time_shift=cfg.train.time_shift, dropout_prob=family.dropout_prob())
            conditioning = family.conditioning(batch, drop, accelerator.device)
            with accelerator.accumulate(model), deepspeed_glue.autocast(accelerator, cfg.train.mixed_precision,
                                                                         zero_stage):
                if cfg.train.stage == "transfer":  # each converted block against its frozen softmax teacher
                    x_t = noisy_latents(x0, noise, t)
                    loss, block_losses = family.transfer_loss(model, x_t, t.to(x0.device), **conditioning)
                else:
                    loss = rectified_flow_loss(partial(family.velocity, model), x0, noise, t, **conditioning)
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
            if cfg.train.ema:
                update_ema(ema, raw_model, cfg.train.ema_decay, zero_stage)
            state.consecutive_nonfinite = 0
        else:
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
        optimizer.zero_grad(set_to_none=True)
        state.step, state.samples_seen = step + 1, state.samples_seen + samples_per_step
        state.train_seconds += time.perf_counter() - step_started
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
                 "tokens_per_s": timed_steps * samples_per_step * tokens_per_sample / elapsed}
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", **{k.replace("_per_s", "/s"): f"{v:.2f}" for k, v in rates.items()})
        last = state.step == cfg.train.max_steps
        if state.step % cfg.train.log_every == 0 or last:
            record = {"loss": float(np.mean(losses)) if losses else float("nan"), "lr": scheduler.get_last_lr()[0],
                      "skipped_steps": state.skipped_steps, "samples_seen": state.samples_seen,
                      "train_seconds": state.train_seconds,
                      "peak_memory_gb": peak_memory_gb(accelerator.device), **rates}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record.update({f"transfer_loss_block_{i:02d}": value for i, value in block_losses.items()})
            metrics.log(state.step, record)
            losses = []
        # While losses are non-finite, keep the last good checkpoint as the newest one.
        if (state.step % cfg.train.checkpoint_every == 0 and state.consecutive_nonfinite == 0) or last:
            write_checkpoint(run_dir, cfg, state, model, ema, optimizer, scheduler, accelerator, zero_stage,
                             extra_files=family.checkpoint_files(raw_model))
        if (cfg.train.sample_every and state.step % cfg.train.sample_every == 0) or last:
            validation_videos(cfg, state.step, family, ema, vae, val_conditions, latent_shape, fps, run_dir, accelerator,
                              metrics)
        if cfg.train.fvd_every and state.step % cfg.train.fvd_every == 0:
            fvd = fvd_of_model(ema, vae.decode, cfg, num_samples=cfg.train.fvd_num_samples, steps=cfg.train.val_steps,
                               cfg_scale=cfg.train.val_cfg_scale, seed=cfg.seed, i3d=fvd_i3d, real_stats=fvd_real,
                               state=accelerator, batch_size=cfg.train.batch_size)
            metrics.log(state.step, {f"fvd{cfg.train.fvd_num_samples}": fvd})
        if cfg.train.score_every and (state.step % cfg.train.score_every == 0 or last):
            score = score_model(ema, vae.decode, cfg, num_samples=cfg.train.score_num_samples,
                                steps=cfg.train.val_steps, cfg_scale=cfg.train.val_cfg_scale, seed=cfg.seed,
                                batch_size=cfg.train.score_num_samples, device=accelerator.device,
                                classifier=score_classifier, record=score_record)
            logger.info(f"step {state.step}: {headline(score)}")
            metrics.log(state.step, {f"demo_{key}": score[key] for key in
                                     ("class_accuracy", "class_probability", "confident_fraction", "reject_fraction")
                                     if score[key] is not None})
    bar.close()
    metrics.close()
    logger.info(f"done: {state.step} steps; checkpoints in {run_dir / 'checkpoints'}, videos in {run_dir / 'samples'}")
    # Drop every reference to wrapped objects before tearing down the process group.
    del model, optimizer, raw_model, batches
    end_processes(accelerator)


if __name__ == "__main__":
    main()
