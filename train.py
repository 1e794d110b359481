"""Train a video DiT with rectified flow, Hydra configs and Accelerate.

    python train.py                                   # the embedded CPU demo
    python train.py --cfg job                         # print the resolved config
    python train.py model=B attention=hla data=videos data.root=/videos
    python train.py -m attention=softmax,linear,hla,mhla   # a sweep, one run dir each
    accelerate launch --config_file configs/accelerate/ddp_8gpu.yaml train.py model=B ...
    accelerate launch --config_file configs/accelerate/zero2.yaml train.py model=XL ...

The run directory is Hydra's ``hydra.run.dir``. Re-running the same command on the
same run directory resumes from its latest checkpoint. The data position is kept in
samples and each sample's noise, flow time and label dropout derive from (seed, the
sample's global position), so an interrupted run resumes to bitwise-identical weights
on CPU, and the same global batch gives the same training whatever the number of
processes (docs/scaling.md). DeepSpeed-specific steps live in the ``deepspeed_*``
helpers below.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import hydra
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, gather_object
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
    checkpoint_tmp_dir,
    finish_checkpoint,
    latest_checkpoint,
    load_state_dict,
    save_state_dict,
    start_checkpoint,
    torch_load,
    torch_save,
)
from dit.flow import rectified_flow_loss, sample_flow_time
from dit.model import VideoDiT, build_dit
from dit.sampling import generate_videos
from eval.fvd import fvd_of_model, load_i3d, training_real_stats
from eval.generation import generation_seed

# Config groups that must match between a run directory's checkpoint and the command resuming it.
RESUME_MUST_MATCH = ("seed", "model", "attention", "data", "vae")
# A collective that waits longer than this (a rank hung, not crashed) fails instead of hanging forever.
# A crashed rank is handled sooner: the launcher (torchrun) stops the others when one exits non-zero.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
DEEPSPEED_DIR, DEEPSPEED_TAG = "deepspeed", "zero"  # <checkpoint>/deepspeed/zero/: DeepSpeed's own files


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
    """Accelerator for one process, DDP or DeepSpeed (as launched).

    Without CUDA, several processes talk over gloo and a DDP launch runs on the CPU, so
    the GPU launch configs also start real CPU processes on a laptop (docs/scaling.md).
    """
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    no_cuda = not torch.cuda.is_available()
    process_group = InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)
    if distributed and no_cuda:
        process_group.backend = "gloo"
    return Accelerator(
        cpu=distributed and no_cuda and not deepspeed,  # DeepSpeed picks its CPU accelerator itself
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.grad_accum_steps,
        kwargs_handlers=[process_group],
    )


def end_with_launcher() -> None:
    """Make this process die with its launcher (Linux).

    torchrun starts every rank in its own session, so if ``accelerate launch`` itself is
    killed (``kill -9``, the OOM killer), the ranks would go on training, orphaned, and
    race a re-run of the command in the same run directory.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before that line
        os._exit(1)


def check_same_run_dir(run_dir: Path, accelerator: Accelerator) -> None:
    """Fail unless every rank resolved the same run directory (e.g. a time-stamped Hydra sweep dir would not)."""
    if accelerator.num_processes == 1:
        return
    run_dirs = gather_object([str(run_dir.resolve())])
    if len(set(run_dirs)) != 1:
        raise RuntimeError(f"the ranks resolved different run directories {sorted(set(run_dirs))}; pin "
                           f"hydra.run.dir (or hydra.sweep.dir for -m) to one path for all processes")


def deepspeed_configure(accelerator: Accelerator, train_cfg: DictConfig) -> int | None:
    """Fill the launched DeepSpeed config from ``train.*``; return its ZeRO stage (None without DeepSpeed).

    train.py owns batch size, accumulation, clipping and precision (the JSON files say
    "auto"); the optimizer is train.py's AdamW. ZeRO-3 must gather its partitioned
    weights for the consolidated ``model.safetensors`` of every checkpoint.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    # DeepSpeed calls collectives that torch deprecates (one warning per call, every step).
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
    config["gradient_accumulation_steps"] = train_cfg.grad_accum_steps
    config["train_batch_size"] = train_cfg.batch_size * train_cfg.grad_accum_steps * accelerator.num_processes
    config["gradient_clipping"] = float(train_cfg.grad_clip)
    zero = config.setdefault("zero_optimization", {})
    zero["stage3_gather_16bit_weights_on_model_save"] = True
    return int(zero.get("stage", 0))


def autocast(accelerator: Accelerator, train_cfg: DictConfig, zero_stage: int | None):
    """Mixed-precision context for the forward pass.

    DeepSpeed keeps bf16/fp16 weights itself (with fp32 master copies in the optimizer),
    and accelerate does not autocast under it; autocast makes fp32 inputs meet them.
    """
    if zero_stage is not None and train_cfg.mixed_precision != "no":
        dtype = torch.bfloat16 if train_cfg.mixed_precision == "bf16" else torch.float16
        return torch.autocast(accelerator.device.type, dtype=dtype)
    return accelerator.autocast()


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


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA max allocated on GPU, max RSS on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def micro_batch_positions(samples_seen: int, micro: int, rank: int, batch_size: int, world: int) -> range:
    """Global stream positions of one rank's micro-batch (the layout of ``data.sampler.SampleStream``).

    Each micro-step consumes one global batch of world × batch_size positions after the
    ``samples_seen`` of the step's start; rank r reads the r-th slice of it.
    """
    first = samples_seen + (micro * world + rank) * batch_size
    return range(first, first + batch_size)


def sample_randomness(cfg: DictConfig, positions: range, latent_shape) -> tuple[torch.Tensor, ...]:
    """Noise ε (B, C, T, H, W), flow times t (B,) and label-drop flags (B,) for a micro-batch.

    Each sample's values come from a CPU generator seeded by (seed, its global stream
    position), so a sample is trained on identically whichever rank, micro-step or
    process count it falls to: 2 processes × batch b, 1 process × batch 2b and
    1 process × batch b × 2 accumulation steps are the same training.
    """
    noise, times, drops = [], [], []
    for position in positions:
        state = np.random.SeedSequence([cfg.seed, position, 0xF10]).generate_state(2)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        noise.append(torch.randn(tuple(latent_shape), generator=generator))
        times.append(sample_flow_time(1, mean=cfg.train.time_mean, std=cfg.train.time_std,
                                      shift=cfg.train.time_shift, generator=generator))
        drops.append(torch.rand(1, generator=generator) < cfg.model.class_dropout_prob)
    return torch.stack(noise), torch.cat(times), torch.cat(drops)


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


def write_checkpoint(run_dir, cfg, state, model, ema, optimizer, scheduler, accelerator, zero_stage) -> None:
    """Write a complete checkpoint; all ranks take part (gathering state, DeepSpeed shards), rank 0 writes the rest.

    Every rank computes the same temporary directory name, so DeepSpeed's per-rank
    optimizer shards land in it before rank 0 indexes it and renames it into place.
    """
    check_replicas_in_sync(state.step, model, ema, accelerator, zero_stage)
    rng_states = gather_rng_states(accelerator)
    model_state = accelerator.get_state_dict(model)  # ZeRO-3: gathered on rank 0
    if accelerator.is_main_process:
        start_checkpoint(run_dir, state.step)
    accelerator.wait_for_everyone()
    writers = {
        "model.safetensors": lambda p: save_state_dict(model_state, p),
        "ema.safetensors": lambda p: save_state_dict(ema.state_dict(), p),
        "config.yaml": lambda p: OmegaConf.save(cfg, p, resolve=True),
        "rng_states.pt": lambda p: torch_save(rng_states, p),
        "trainer_state.json": lambda p: p.write_text(json.dumps(
            {**asdict(state), "world_size": accelerator.num_processes, "zero_stage": zero_stage,
             "scheduler": scheduler.state_dict()}, indent=2)),
    }
    if zero_stage is None:
        writers["optimizer.pt"] = lambda p: torch_save(optimizer.state_dict(), p)
    else:
        deepspeed_save_state(model, checkpoint_tmp_dir(run_dir, state.step) / DEEPSPEED_DIR)
    if accelerator.is_main_process:
        finish_checkpoint(run_dir, state.step, writers)
    accelerator.wait_for_everyone()


def load_checkpoint(checkpoint, model, ema, optimizer, scheduler, accelerator, zero_stage) -> TrainState:
    """Restore weights, EMA, LR schedule, counters, this rank's RNG and (without DeepSpeed) the optimizer.

    Under DeepSpeed the optimizer shards are loaded after ``accelerator.prepare``
    (``deepspeed_load_state``); they need the same ZeRO stage and number of processes.
    """
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    saved_world, saved_stage = saved.pop("world_size", None), saved.pop("zero_stage", None)
    if saved_stage != zero_stage or (zero_stage is not None and saved_world != accelerator.num_processes):
        def describe(stage, world):
            return "DDP / one process" if stage is None else f"DeepSpeed ZeRO-{stage} on {world} processes"

        raise CheckpointError(
            f"{checkpoint} holds optimizer state of {describe(saved_stage, saved_world)}, but this run uses "
            f"{describe(zero_stage, accelerator.num_processes)}. DDP checkpoints resume on any number of processes; "
            f"DeepSpeed ones only with the same ZeRO stage and process count. To change, start a new run directory "
            f"from the weights (model.safetensors / ema.safetensors)."
        )
    model.load_state_dict(load_state_dict(checkpoint / "model.safetensors"))
    ema.load_state_dict(load_state_dict(checkpoint / "ema.safetensors"))
    if zero_stage is None:
        optimizer.load_state_dict(torch_load(checkpoint / "optimizer.pt"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    set_scheduled_lr(scheduler)
    if (checkpoint / "rng_states.pt").is_file():
        restore_rng_state(torch_load(checkpoint / "rng_states.pt"), accelerator.process_index)
    return TrainState(**saved)


def check_replicas_in_sync(step: int, model, ema, accelerator: Accelerator, zero_stage: int | None) -> None:
    """Fail if data-parallel replicas hold different weights (they must stay bitwise equal).

    Compares a hash of every rank's model and EMA weights; skipped for one process and
    for ZeRO-3, whose ranks hold different partitions by design.
    """
    if accelerator.num_processes == 1 or zero_stage == 3:
        return
    digest = hashlib.sha256()
    for tensor in [*accelerator.unwrap_model(model).parameters(), *ema.parameters()]:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) != 1:
        raise RuntimeError(f"step {step}: model/EMA weights differ across ranks (hashes {digests}); "
                           f"the data-parallel replicas have diverged")
    accelerator.print(f"step {step}: model and EMA weights identical on all {len(digests)} ranks")


# ---------------------------------------------------------------------------------------- parameter updates


def zero3_gathered(params: list, zero_stage: int | None):
    """Context in which ZeRO-3's partitioned parameters hold their full values (read only); else a no-op."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def update_ema(ema: VideoDiT, model: VideoDiT, decay: float, zero_stage: int | None) -> None:
    """ema ← decay·ema + (1 − decay)·model, in fp32, on every rank.

    Under ZeRO-3 the model's parameters are gathered for the update (the EMA itself is
    a full, unpartitioned copy on every rank; docs/scaling.md discusses the cost).
    """
    params = list(model.parameters())
    with zero3_gathered(params, zero_stage):
        torch._foreach_lerp_(list(ema.parameters()), [p.detach().float() for p in params], 1 - decay)


@torch.no_grad()
def clamp_mixing(model: VideoDiT, zero_stage: int | None) -> None:
    """Project MHLA mixing matrices onto [0, 1] where the optimizer keeps the weights.

    Without DeepSpeed the module's parameters are the weights. DeepSpeed steps fp32 master
    copies inside its optimizer and copies them into the module after each step, so the
    masters are clamped too, else the next step would undo the clamp.
    """
    model.clamp_mixing_()  # the module's (ZeRO-1/2: replicated working) copy
    if zero_stage is not None:
        deepspeed_clamp_masters(model, zero_stage)


def deepspeed_clamp_masters(model: VideoDiT, zero_stage: int) -> None:
    """Clamp the DeepSpeed fp32 masters (and ZeRO-3's working partitions) of the MHLA mixing matrices.

    The clamp is element-wise, so ZeRO-3 ranks clamp only their own partitions. ZeRO-1/2
    assemble each (small, M×M) matrix with one all-reduce: every rank must call this.
    """
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    for module in model.modules():
        mixing = getattr(module, "mixing", None)
        if not (hasattr(module, "clamp_mixing_") and isinstance(mixing, torch.nn.Parameter)):
            continue
        if zero_stage == 3:
            mixing.ds_tensor.clamp_(0.0, 1.0)
            safe_set_local_fp32_param(mixing, safe_get_local_fp32_param(mixing).clamp(0.0, 1.0))
        else:
            master = safe_get_full_fp32_param(mixing)
            if master is not None:
                safe_set_full_fp32_param(mixing, master.clamp(0.0, 1.0))


def deepspeed_grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm DeepSpeed computed (and clipped with) in its step, if it has one."""
    norm = engine.get_global_grad_norm()
    return None if norm is None else torch.as_tensor(float(norm))


def deepspeed_save_state(engine, directory: Path) -> None:
    """All ranks: DeepSpeed's own checkpoint (module + this rank's ZeRO optimizer shard) into ``directory``."""
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False)


def deepspeed_load_state(engine, checkpoint: Path, scheduler) -> None:
    """All ranks: restore the module, fp32 masters and optimizer shards of a checkpoint's ``deepspeed/``.

    DeepSpeed's loader unpickles these files: resume only from run directories you trust.
    """
    directory = checkpoint / DEEPSPEED_DIR
    if not (directory / DEEPSPEED_TAG).is_dir():
        raise CheckpointError(f"{checkpoint} has no {DEEPSPEED_DIR}/{DEEPSPEED_TAG}/ (DeepSpeed optimizer state)")
    engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=True, load_optimizer_states=True,
                           load_lr_scheduler_states=False)
    set_scheduled_lr(scheduler)


def set_scheduled_lr(scheduler) -> None:
    """Put the LR schedule's current value into the optimizer, whatever a loaded optimizer state held."""
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


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
        ema, vae.decode, seeds=[generation_seed(cfg.seed, i) for i in mine], labels=labels,
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
    end_with_launcher()
    accelerator = make_accelerator(cfg.train)
    check_same_run_dir(run_dir, accelerator)
    zero_stage = deepspeed_configure(accelerator, cfg.train)  # None unless launched with DeepSpeed
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
        state = load_checkpoint(checkpoint, model, ema, optimizer, scheduler, accelerator, zero_stage)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if checkpoint is not None:
        if zero_stage is not None:
            deepspeed_load_state(model, checkpoint, scheduler)
        accelerator.print(f"resumed from {checkpoint} (step {state.step}, {state.samples_seen} samples seen)")

    stream = SampleStream(len(dataset), seed=cfg.seed, batch_size=cfg.train.batch_size, rank=rank,
                          world_size=world, start=state.samples_seen)
    batches = iter(sample_stream_loader(dataset, stream, num_workers=cfg.data.num_workers))
    samples_per_step = cfg.train.batch_size * world * cfg.train.grad_accum_steps
    logger = MetricsLogger(cfg, run_dir, enabled=accelerator.is_main_process)
    fps = cfg.data.get("fps") or 8
    # Optional periodic FVD of the EMA weights; without I3D weights this stops here, before training.
    fvd_i3d = load_i3d(device=accelerator.device) if cfg.train.fvd_every else None
    fvd_real = training_real_stats(cfg, vae, fvd_i3d, accelerator)[0] if fvd_i3d is not None else None

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
            positions = micro_batch_positions(state.samples_seen, micro, rank, cfg.train.batch_size, world)
            noise, t, drop = sample_randomness(cfg, positions, x0.shape[1:])
            labels = batch["label"].to(accelerator.device) if num_classes else None
            drop = drop.to(accelerator.device) if labels is not None and cfg.model.class_dropout_prob > 0 else None
            with accelerator.accumulate(model), autocast(accelerator, cfg.train, zero_stage):
                loss = rectified_flow_loss(
                    model, x0, labels=labels, drop_labels=drop, time_mean=cfg.train.time_mean,
                    time_std=cfg.train.time_std, time_shift=cfg.train.time_shift, noise=noise, t=t,
                )
                accelerator.backward(loss)  # DeepSpeed: also clips and steps at the last micro-step
            step_losses.append(loss.detach())
        loss = accelerator.reduce(torch.stack(step_losses).mean(), reduction="mean")
        finite = bool(torch.isfinite(loss))
        grad_norm = None
        if zero_stage is not None:  # DeepSpeed has stepped already: a non-finite step cannot be skipped, only counted
            grad_norm = deepspeed_grad_norm(model)
        elif finite and cfg.train.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        finite = finite and (grad_norm is None or bool(torch.isfinite(grad_norm)))
        if finite:
            optimizer.step()  # a no-op under DeepSpeed
            scheduler.step()
            clamp_mixing(raw_model, zero_stage)
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
                       "skipped_steps": state.skipped_steps, "samples_seen": state.samples_seen,
                       "peak_memory_gb": peak_memory_gb(accelerator.device), **rates}
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            logger.log(state.step, metrics)
            losses = []
        # While losses are non-finite, keep the last good checkpoint as the newest one.
        due = state.step % cfg.train.checkpoint_every == 0 and state.consecutive_nonfinite == 0
        if due or state.step == cfg.train.max_steps:
            write_checkpoint(run_dir, cfg, state, model, ema, optimizer, scheduler, accelerator, zero_stage)
        sample_every = cfg.train.sample_every
        if (sample_every and state.step % sample_every == 0) or state.step == cfg.train.max_steps:
            validation_videos(cfg, state.step, ema, vae, num_classes, fps, run_dir, accelerator, logger)
        if cfg.train.fvd_every and state.step % cfg.train.fvd_every == 0:
            fvd = fvd_of_model(ema, vae.decode, cfg, num_samples=cfg.train.fvd_num_samples, steps=cfg.train.val_steps,
                               cfg_scale=cfg.train.val_cfg_scale, seed=cfg.seed, i3d=fvd_i3d, real_stats=fvd_real,
                               state=accelerator, batch_size=cfg.train.batch_size)
            logger.log(state.step, {f"fvd{cfg.train.fvd_num_samples}": fvd})
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
