"""A training run's complete state in checkpoints: writing it from every rank, and resuming from it.

A checkpoint (layout in :mod:`dit.checkpoint`) restores model, EMA, optimizer (DeepSpeed: its
shards under ``deepspeed/``), LR schedule, the data position counted in samples and every
rank's RNG, so an interrupted run resumes to bitwise-identical weights on CPU.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf
from torch import nn

from configs.logs import get_logger
from configs.schema import data_identity
from dit import deepspeed_glue
from dit.checkpoint import (
    CheckpointError,
    checkpoint_tmp_dir,
    finish_checkpoint,
    load_state_dict,
    save_state_dict,
    start_checkpoint,
    torch_load,
    torch_save,
)

logger = get_logger(__name__)

# Config groups that must match between a run directory's checkpoint and the command resuming it.
RESUME_MUST_MATCH = ("seed", "model", "attention", "data", "vae")


@dataclass
class TrainState:
    """Counters saved with every checkpoint (trainer_state.json)."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    samples_seen: int = 0  # global data position, in samples
    skipped_steps: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive_nonfinite: int = 0
    train_seconds: float = 0.0  # wall-clock time spent in training steps (not checkpoints or videos), all runs


def check_resume_compatible(cfg: DictConfig, checkpoint: Path) -> None:
    """Refuse to resume a run directory whose checkpoint was made with other settings."""
    saved = OmegaConf.load(checkpoint / "config.yaml")

    def settings(config: DictConfig, key: str):
        value = config.get(key)
        value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        if key == "data" and isinstance(value, dict):
            value = data_identity(value)  # which data, not how it is loaded
        return value

    differing = [key for key in RESUME_MUST_MATCH if settings(saved, key) != settings(cfg, key)]
    if differing:
        raise CheckpointError(
            f"the run directory's checkpoint {checkpoint} was made with different {differing} settings; "
            f"resume with the same settings, or choose a new run directory (hydra.run.dir=...)"
        )


def gather_rng_states(accelerator: Accelerator) -> list[dict]:
    """Every rank's torch, CUDA, numpy and python RNG state (tensors and plain lists only)."""
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
    """This rank's RNG state from a checkpoint (more processes than when saved: the rest keep derived seeds)."""
    if rank >= len(states):
        return
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def check_replicas_in_sync(step: int, model: nn.Module, ema: nn.Module, accelerator: Accelerator,
                           zero_stage: int | None) -> None:
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
    logger.info(f"step {step}: model and EMA weights identical on all {len(digests)} ranks")


def write_checkpoint(run_dir: Path, cfg: DictConfig, state: TrainState, model, ema: nn.Module, optimizer, scheduler,
                     accelerator: Accelerator, zero_stage: int | None,
                     extra_files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write a complete checkpoint; all ranks take part (gathering state, DeepSpeed shards), rank 0 writes the rest.

    ``extra_files``: more files of the checkpoint, name -> writer (e.g. a pretrained model's architecture).

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
        **(extra_files or {}),
    }
    if zero_stage is None:
        writers["optimizer.pt"] = lambda p: torch_save(optimizer.state_dict(), p)
    else:
        deepspeed_glue.save_state(model, checkpoint_tmp_dir(run_dir, state.step) / deepspeed_glue.DEEPSPEED_DIR)
    if accelerator.is_main_process:
        finish_checkpoint(run_dir, state.step, writers)
    accelerator.wait_for_everyone()


def load_checkpoint(checkpoint: Path, model: nn.Module, ema: nn.Module, optimizer, scheduler,
                    accelerator: Accelerator, zero_stage: int | None) -> TrainState:
    """Restore weights, EMA, LR schedule, counters, this rank's RNG and (without DeepSpeed) the optimizer.

    Under DeepSpeed the optimizer shards are loaded after ``accelerator.prepare``
    (:func:`load_deepspeed_state`); they need the same ZeRO stage and number of processes.
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


def load_deepspeed_state(engine, checkpoint: Path, scheduler) -> None:
    """All ranks, after ``accelerator.prepare``: DeepSpeed's optimizer shards, then the schedule's LR."""
    deepspeed_glue.load_state(engine, checkpoint)
    set_scheduled_lr(scheduler)


def set_scheduled_lr(scheduler) -> None:
    """Put the LR schedule's current value into the optimizer, whatever a loaded optimizer state held."""
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
