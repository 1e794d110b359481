"""Checkpoint directories: atomic writes, completeness checks, safe loading.

Layout of a run directory::

    <run dir>/checkpoints/
        step_00000100/          one complete checkpoint
            model.safetensors   raw model weights
            ema.safetensors     EMA weights (what sample.py uses)
            config.yaml         the resolved run config
            optimizer.pt        optimizer state (tensors only; loaded with weights_only=True)
            trainer_state.json  step, data position in samples, counters, LR schedule state
            rng_states.pt       every rank's torch / numpy / python RNG state
            deepspeed/          DeepSpeed runs only, instead of optimizer.pt: the engine's own
                                checkpoint, one ZeRO optimizer shard per rank
            checkpoint.json     written last: every file (sub-directories included) and its size
        latest                  text file naming the newest complete checkpoint

A checkpoint is written into a hidden temporary directory, completed with
``checkpoint.json``, renamed into place, and only then does ``latest`` change
(itself replaced atomically). A crash at any point leaves the previous checkpoint
and pointer intact. The temporary directory's name depends only on the step
(:func:`checkpoint_tmp_dir`), so that every rank of a multi-process run can write its
shards into it (:func:`start_checkpoint` on one rank, shards from all ranks, then
:func:`finish_checkpoint` on one rank). Loading never unpickles code: weights are
safetensors and ``torch.load`` is always called with ``weights_only=True``. The one
exception is ``deepspeed/``, which DeepSpeed's own loader reads with pickle: load
those shards only from runs you made yourself.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from configs.files import atomic_write_text, fsync_dir, fsync_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
INDEX = "checkpoint.json"
REQUIRED_FILES = ("model.safetensors", "ema.safetensors", "config.yaml", "trainer_state.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_state_dict(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save tensors as safetensors (copied to contiguous CPU tensors)."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def checkpoint_tmp_dir(run_dir: Path, step: int) -> Path:
    """The hidden directory a step's checkpoint is written into (the same on every rank)."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{checkpoint_name(step)}"


def start_checkpoint(run_dir: Path, step: int) -> Path:
    """Create an empty temporary directory for a step's checkpoint (removing a stale one) and return it."""
    tmp = checkpoint_tmp_dir(run_dir, step)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def finish_checkpoint(run_dir: Path, step: int, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Add the writers' files to the step's temporary directory, index it, rename it into place, move ``latest``.

    writers: file name -> function writing that file at the given path. Must include
    every name in ``REQUIRED_FILES``. Files that other ranks already wrote into the
    temporary directory (e.g. ``deepspeed/``) are indexed too. Returns the checkpoint directory.
    """
    missing = [name for name in REQUIRED_FILES if name not in writers]
    if missing:
        raise ValueError(f"save_checkpoint: writers for {missing} are required")
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = checkpoint_tmp_dir(run_dir, step)
    if not tmp.is_dir():
        raise CheckpointError(f"{tmp} does not exist; call start_checkpoint first")
    for name, write in writers.items():
        write(tmp / name)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    sizes = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in files}
    atomic_write_text(tmp / INDEX, json.dumps({"step": step, "files": sizes}, indent=2))
    for p in files:
        fsync_file(p)
    for directory in {p.parent for p in files}:
        fsync_dir(directory)
    if final.exists():  # re-saving the same step (e.g. after a resume): swap, then delete the old one
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / LATEST, final.name + "\n")
    return final


def save_checkpoint(run_dir: Path, step: int, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write one checkpoint atomically from one process and point ``latest`` at it.

    writers: file name -> function writing that file at the given path. Must include
    every name in ``REQUIRED_FILES``. Returns the checkpoint directory.
    """
    missing = [name for name in REQUIRED_FILES if name not in writers]
    if missing:
        raise ValueError(f"save_checkpoint: writers for {missing} are required")
    start_checkpoint(run_dir, step)
    return finish_checkpoint(run_dir, step, writers)


def validate_checkpoint(path: Path) -> Path:
    """Raise CheckpointError unless ``path`` is a complete checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    index = path / INDEX
    if not index.is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {INDEX}; it was probably interrupted while being written). "
            f"Use an earlier checkpoint or delete this directory."
        )
    try:
        files = json.loads(index.read_text())["files"]
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable {INDEX} ({error})") from error
    problems = [name for name in REQUIRED_FILES if name not in files]
    for name, size in files.items():
        if name == INDEX:
            continue
        if not (path / name).is_file():
            problems.append(f"{name} (missing)")
        elif (path / name).stat().st_size != size:
            problems.append(f"{name} (size {(path / name).stat().st_size}, expected {size})")
    if problems:
        raise CheckpointError(f"checkpoint {path} is incomplete or damaged: {', '.join(problems)}")
    return path


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint ``latest`` points to (validated), or None for a fresh run directory."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        return validate_checkpoint(root / pointer.read_text().strip())
    if checkpoint_dirs(run_dir):
        raise CheckpointError(
            f"{root} holds checkpoints but no '{LATEST}' pointer; pass one explicitly or write its name into {pointer}"
        )
    return None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a checkpoint directory was written at: its ``trainer_state.json``, else its name."""
    state_file = checkpoint / "trainer_state.json"
    if state_file.is_file():
        return int(json.loads(state_file.read_text())["step"])
    return int(checkpoint.name.split("_")[-1])


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (-> its latest checkpoint) or a checkpoint directory, validated."""
    path = Path(path).expanduser()
    if (path / CHECKPOINTS).is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run directory {path} has no complete checkpoint yet")
        return found
    if path.is_dir() and path.name.startswith("step_"):
        return validate_checkpoint(path)
    raise CheckpointError(
        f"{path} is neither a run directory (with {CHECKPOINTS}/) nor a checkpoint directory (step_XXXXXXXX/)"
    )


def torch_save(obj, path: Path) -> None:
    torch.save(obj, path)


def torch_load(path: Path):
    """torch.load that can only rebuild tensors and plain containers (never code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_dit_for_sampling(checkpoint: Path, run_cfg, latent_shape, weights: str = "ema"):
    """The DiT of a checkpoint with its EMA (``weights="ema"``) or raw (``"model"``) weights, in eval mode.

    run_cfg: the checkpoint's ``config.yaml``; latent_shape: (C, T, H, W) of the run's
    latents (``data.training_data.TrainingData.latent_shape``).
    """
    from .model import build_dit

    if weights not in ("ema", "model"):
        raise ValueError(f"weights={weights!r} is not valid; choose one of ['ema', 'model']")
    model = build_dit(run_cfg.model, run_cfg.attention, in_channels=latent_shape[0], input_size=latent_shape[1:],
                      num_classes=run_cfg.data.num_classes)
    model.load_state_dict(load_state_dict(Path(checkpoint) / f"{weights}.safetensors"))
    return model.eval()
