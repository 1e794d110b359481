"""Train a video DiT with rectified flow, Hydra configs and Accelerate.

    python train.py                                   # the embedded CPU demo
    python train.py --cfg job                         # print the resolved config
    python train.py model=B attention=hla data=videos data.root=/videos
    python train.py -m attention=softmax,linear,hla,mhla   # a sweep, one run dir each
    accelerate launch --multi_gpu --num_processes 8 train.py model=B ...

The run directory is Hydra's ``hydra.run.dir``. Re-running the same command on the
same run directory resumes from its latest checkpoint. Every random number derives
from (seed, step, rank) and the data position is kept in samples, so an
interrupted run resumes to bitwise-identical weights on CPU.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, gather_object
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from configs.schema import validate_train_config
from data.datasets import build_video_dataset
from data.sampler import SampleStream, sample_stream_loader
from data.vae import build_vae, data_latent_shape
from data.video import write_grid_mp4, write_mp4
from dit.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_state_dict,
    save_checkpoint,
    save_state_dict,
    torch_load,
    torch_save,
)
from dit.flow import rectified_flow_loss
from dit.model import VideoDiT, build_dit
from dit.sampling import generate_videos

# Config groups that must match between a run directory's checkpoint and the command resuming it.
RESUME_MUST_MATCH = ("seed", "model", "attention", "data", "vae")


@dataclass
class TrainState:
    """Counters saved with every checkpoint (trainer_state.json)."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    samples_seen: int = 0  # global data position, in samples
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_nonfinite: int = 0


class NonFiniteLossError(RuntimeError):
    """Too many consecutive NaN/Inf losses."""


# ---------------------------------------------------------------------------------------- set-up


def make_accelerator(train_cfg: DictConfig) -> Accelerator:
    """Accelerator for CPU/GPU, DDP or DeepSpeed (as launched), with gloo when there is no CUDA."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    kwargs = [InitProcessGroupKwargs(backend="gloo")] if distributed and not torch.cuda.is_available() else []
    return Accelerator(
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.grad_accum_steps,
        kwargs_handlers=kwargs,
    )


def build_training_data(cfg: DictConfig):
    """The training dataset: video clips (encoded on the fly) or pre-extracted latents."""
    if cfg.data.name == "latents":
        from data.latents import LatentDataset

        return LatentDataset.from_config(cfg.data, vae_cfg=cfg.vae)
    return build_video_dataset(cfg.data, seed=cfg.seed)


def lr_factor(step: int, train_cfg: DictConfig) -> float:
    """Multiplier of the peak LR at a step: linear warm-up, then constant or cosine to 0."""
    warmup = train_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if train_cfg.lr_schedule == "cosine":
        progress = (step - warmup) / max(1, train_cfg.max_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


def step_generator(seed: int, step: int, rank: int, micro_step: int) -> torch.Generator:
    """The CPU generator for one micro-step of one rank: noise, flow times, label dropout."""
    state = np.random.SeedSequence([seed, step, rank, micro_step]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def print_model_summary(model: VideoDiT, cfg: DictConfig, accelerator: Accelerator) -> dict:
    """Print and return parameter count, tokens per sample and forward FLOPs per sample."""
    macs = model.macs_per_sample()
    summary = {
        "parameters": model.num_parameters(),
        "tokens_per_sample": model.num_tokens,
        "token_grid": list(model.grid),
        "forward_flops_per_sample": 2 * macs,
        "attention": cfg.attention.name,
    }
    accelerator.print(
        f"model {cfg.model.name}: {summary['parameters'] / 1e6:.2f} M parameters | "
        f"{model.num_tokens} tokens per sample (grid {model.grid}) | "
        f"forward {2 * macs / 1e9:.3f} GFLOPs per sample with {cfg.attention.name} attention"
    )
    return summary


# ---------------------------------------------------------------------------------------- checkpoints


def check_resume_compatible(cfg: DictConfig, checkpoint: Path) -> None:
    """Refuse to resume a run directory whose checkpoint was made with other settings."""
    saved = OmegaConf.load(checkpoint / "config.yaml")

    def settings(config: DictConfig, key: str):
        value = config.get(key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if key == "data" and isinstance(value, dict):
            value.pop("num_workers", None)  # how data is loaded, not which data
        return value

    differing = [key for key in RESUME_MUST_MATCH if settings(saved, key) != settings(cfg, key)]
    if differing:
        raise CheckpointError(
            f"the run directory's checkpoint {checkpoint} was made with different {differing} settings; "
            f"resume with the same settings, or choose a new run directory (hydra.run.dir=...)"
        )


def gather_rng_states(accelerator: Accelerator) -> list[dict]:
    """Every rank's torch, CUDA, numpy and python RNG state (tensors and plain lists only)."""
    import random

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    return gather_object([state]) if accelerator.num_processes > 1 else [state]


def restore_rng_state(states: list[dict], rank: int) -> None:
    import random

    if rank >= len(states):  # more processes than when saved: derived seeds cover the rest
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def write_checkpoint(run_dir, cfg, state, model, ema, optimizer, scheduler, accelerator) -> None:
    """Rank 0 writes a complete checkpoint; all ranks take part in gathering state."""
    rng_states = gather_rng_states(accelerator)
    model_state = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        save_checkpoint(
            run_dir,
            state.step,
            {
                "model.safetensors": lambda p: save_state_dict(model_state, p),
                "ema.safetensors": lambda p: save_state_dict(ema.state_dict(), p),
                "config.yaml": lambda p: OmegaConf.save(cfg, p, resolve=True),
                "optimizer.pt": lambda p: torch_save(optimizer.state_dict(), p),
                "rng_states.pt": lambda p: torch_save(rng_states, p),
                "trainer_state.json": lambda p: p.write_text(
                    json.dumps({**asdict(state), "world_size": accelerator.num_processes,
                                "scheduler": scheduler.state_dict()}, indent=2)
                ),
            },
        )
    accelerator.wait_for_everyone()


def load_checkpoint(checkpoint, model, ema, optimizer, scheduler, accelerator) -> TrainState:
    model.load_state_dict(load_state_dict(checkpoint / "model.safetensors"))
    ema.load_state_dict(load_state_dict(checkpoint / "ema.safetensors"))
    optimizer.load_state_dict(torch_load(checkpoint / "optimizer.pt"))
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    scheduler.load_state_dict(saved.pop("scheduler"))
    saved.pop("world_size", None)
    if (checkpoint / "rng_states.pt").is_file():
        restore_rng_state(torch_load(checkpoint / "rng_states.pt"), accelerator.process_index)
    return TrainState(**saved)


# ---------------------------------------------------------------------------------------- logging


class MetricsLogger:
    """metrics.jsonl in the run directory, plus tensorboard or wandb. Rank 0 only."""

    def __init__(self, cfg: DictConfig, run_dir: Path, enabled: bool):
        self.enabled, self.backend, self.run = enabled, cfg.logger.name, None
        if not enabled:
            return
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        if self.backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.run = SummaryWriter(str(run_dir / "tensorboard"))
        elif self.backend == "wandb":
            import wandb

            mode = cfg.logger.mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.run = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir), mode=mode,
                config=OmegaConf.to_container(cfg, resolve=True), id=run_dir.resolve().name.replace("=", "-"),
                resume="allow",
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.backend == "tensorboard":
            for key, value in metrics.items():
                self.run.add_scalar(key, value, step)
        elif self.backend == "wandb":
            self.run.log(metrics, step=step)

    def log_video(self, step: int, path: Path) -> None:
        if self.enabled and self.backend == "wandb":
            import wandb

            self.run.log({"samples": wandb.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.backend == "tensorboard":
            self.run.close()
        elif self.backend == "wandb":
            self.run.finish()


def validation_videos(cfg, step, ema, vae, num_classes, fps, run_dir, accelerator, logger) -> None:
    """EMA samples split across ranks; rank 0 writes them as mp4 files under samples/."""
    count = cfg.train.num_val_samples
    if count == 0:
        return
    mine = list(range(accelerator.process_index, count, accelerator.num_processes))
    labels = [i % num_classes for i in mine] if num_classes else None
    videos = generate_videos(
        ema, vae.decode, seeds=[cfg.seed * 100_003 + i for i in mine], labels=labels,
        steps=cfg.train.val_steps, cfg_scale=cfg.train.val_cfg_scale, shift=cfg.train.time_shift,
        batch_size=cfg.train.batch_size, device=accelerator.device,
    )
    pieces = gather_object([(i, v) for i, v in zip(mine, videos)]) if accelerator.num_processes > 1 else list(zip(mine, videos))
    if accelerator.is_main_process:
        ordered = [video for _, video in sorted(pieces, key=lambda item: item[0])]
        out = run_dir / "samples" / f"step_{step:08d}"
        for i, video in enumerate(ordered):
            write_mp4(out / f"sample_{i:03d}.mp4", video, fps)
        write_grid_mp4(out / "grid.mp4", ordered, fps)
        logger.log_video(step, out / "grid.mp4")
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------- main


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    validate_train_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    accelerator = make_accelerator(cfg.train)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed)

    # VAE, model, then data: every invalid setting fails here, before any training work.
    vae = build_vae(cfg.vae, device=accelerator.device)
    latent_shape = data_latent_shape(cfg.data, vae)
    num_classes = cfg.data.num_classes
    model = build_dit(cfg.model, cfg.attention, in_channels=latent_shape[0], input_size=latent_shape[1:],
                      num_classes=num_classes)
    summary = print_model_summary(model, cfg, accelerator)
    dataset = build_training_data(cfg)
    ema = copy.deepcopy(model).requires_grad_(False).to(accelerator.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "model_summary.json").write_text(json.dumps(summary, indent=2))
        skipped = getattr(dataset, "skipped", [])
        if skipped:
            dataset.write_skipped_report(run_dir / "skipped_files.txt")
            accelerator.print(f"skipped {len(skipped)} unreadable or too-short file(s); see {run_dir / 'skipped_files.txt'}")

    state = TrainState()
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        check_resume_compatible(cfg, checkpoint)
        state = load_checkpoint(checkpoint, model, ema, optimizer, scheduler, accelerator)
        accelerator.print(f"resumed from {checkpoint} (step {state.step}, {state.samples_seen} samples seen)")
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    stream = SampleStream(len(dataset), seed=cfg.seed, batch_size=cfg.train.batch_size, rank=rank,
                          world_size=world, start=state.samples_seen)
    batches = iter(sample_stream_loader(dataset, stream, num_workers=cfg.data.num_workers))
    samples_per_step = cfg.train.batch_size * world * cfg.train.grad_accum_steps
    logger = MetricsLogger(cfg, run_dir, enabled=accelerator.is_main_process)
    fps = cfg.data.get("fps") or 8

    progress = tqdm(total=cfg.train.max_steps, initial=state.step, disable=not accelerator.is_main_process,
                    desc="train", dynamic_ncols=True)
    timer, timed_steps, losses = time.perf_counter(), 0, []
    for step in range(state.step, cfg.train.max_steps):
        model.train()
        step_losses = []
        for micro in range(cfg.train.grad_accum_steps):
            batch = next(batches)
            with torch.no_grad():
                if "latents" in batch:
                    x0 = batch["latents"].to(accelerator.device)
                else:
                    x0 = vae.encode(batch["video"].to(accelerator.device))
            generator = step_generator(cfg.seed, step, rank, micro)
            labels = batch["label"].to(accelerator.device) if num_classes else None
            drop = None
            if labels is not None and cfg.model.class_dropout_prob > 0:
                drop = (torch.rand(labels.shape, generator=generator) < cfg.model.class_dropout_prob).to(labels.device)
            with accelerator.accumulate(model), accelerator.autocast():
                loss = rectified_flow_loss(
                    model, x0, labels=labels, drop_labels=drop, time_mean=cfg.train.time_mean,
                    time_std=cfg.train.time_std, time_shift=cfg.train.time_shift, generator=generator,
                )
                accelerator.backward(loss)
            step_losses.append(loss.detach())
        loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean")
        finite = bool(torch.isfinite(loss))
        grad_norm = None
        if finite and cfg.train.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            scheduler.step()
            raw_model.clamp_mixing_()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - cfg.train.ema_decay)
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

        if finite:
            losses.append(loss.item())
        timed_steps += 1
        elapsed = time.perf_counter() - timer
        rates = {
            "steps_per_s": timed_steps / elapsed,
            "samples_per_s": timed_steps * samples_per_step / elapsed,
            "tokens_per_s": timed_steps * samples_per_step * raw_model.num_tokens / elapsed,
        }
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}", **{k.replace("_per_s", "/s"): f"{v:.2f}" for k, v in rates.items()})
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
            metrics = {"loss": float(np.mean(losses)) if losses else float("nan"), "lr": scheduler.get_last_lr()[0],
                       "skipped_steps": state.skipped_steps, "samples_seen": state.samples_seen, **rates}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            logger.log(state.step, metrics)
            losses = []
        # While losses are non-finite, keep the last good checkpoint as the newest one.
        due = state.step % cfg.train.checkpoint_every == 0 and state.consecutive_nonfinite == 0
        if due or state.step == cfg.train.max_steps:
            write_checkpoint(run_dir, cfg, state, model, ema, optimizer, scheduler, accelerator)
        sample_every = cfg.train.sample_every
        if (sample_every and state.step % sample_every == 0) or state.step == cfg.train.max_steps:
            validation_videos(cfg, state.step, ema, vae, num_classes, fps, run_dir, accelerator, logger)
    progress.close()
    logger.close()
    if accelerator.is_main_process:
        accelerator.print(f"done: {state.step} steps; checkpoints in {run_dir / 'checkpoints'}, "
                          f"videos in {run_dir / 'samples'}")

    # Drop every reference to wrapped objects before tearing down the process group:
    # this avoids the gloo abort at exit seen in multi-process runs.
    del model, optimizer, raw_model, batches
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()


if __name__ == "__main__":
    main()
