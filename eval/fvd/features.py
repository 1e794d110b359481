"""Videos -> I3D features -> streaming statistics, on one process or split across several.

``video_features`` preprocesses uint8 clips exactly as the protocol says (``preprocess_videos``)
and runs the I3D; ``stream_stats`` turns any source of clips (files, decoded latents, generated
videos) into :class:`~eval.fvd.stats.FeatureStats`, batch k on rank k % world; ``cached_stats``
keeps real statistics on disk.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from torch import nn

from configs.files import cache_root
from configs.logs import get_logger, progress
from configs.processes import process_state
from eval.fvd.i3d import NUM_CLASSES, RESOLUTION
from eval.fvd.stats import FeatureStats, frechet_distance
from eval.fvd.weights import is_pretrained, load_i3d

logger = get_logger(__name__)

def preprocess_videos(videos_uint8: Any, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) RGB -> float32 (N, 3, T, 224, 224) in [-1, 1].

    Pixels map as ``x / 127.5 - 1``, then every frame is resized *full-frame* (aspect ratio
    not kept, no crop) to 224x224 with ``torch.nn.functional.interpolate(mode='bilinear',
    align_corners=False, antialias=False)``: the same as StyleGAN-V's ``resize=True`` path
    (trilinear with T unchanged == per-frame bilinear).  No antialiasing, so strong
    downscaling aliases exactly as in the reference implementations.  224x224 input is
    passed through unchanged.
    """
    arr = videos_uint8
    if isinstance(arr, np.ndarray) and not arr.flags.writeable:
        arr = arr.copy()
    x = torch.as_tensor(arr)
    if x.dtype != torch.uint8:
        raise ValueError(f"preprocess_videos expects uint8 pixels in 0..255, got {x.dtype}")
    if x.ndim != 5 or x.shape[-1] != 3:
        raise ValueError(f"preprocess_videos expects (N, T, H, W, 3) RGB, got shape {tuple(x.shape)}")
    n, t, h, w, _ = x.shape
    x = x.to(device).permute(0, 1, 4, 2, 3).reshape(n * t, 3, h, w).float() / 127.5 - 1.0
    if (h, w) != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False, antialias=False)
    return x.reshape(n, t, 3, RESOLUTION, RESOLUTION).permute(0, 2, 1, 3, 4).contiguous()


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def _preprocess_chunk(chunk: Any, device: torch.device) -> torch.Tensor:
    """A (B, T, H, W, 3) array, or a list of (T, H, W, 3) clips of possibly different sizes."""
    if isinstance(chunk, (np.ndarray, torch.Tensor)):
        return preprocess_videos(chunk, device)
    return torch.cat([preprocess_videos(np.asarray(clip)[None], device) for clip in chunk])


def video_features(videos_uint8: Any, i3d: nn.Module, batch_size: int = 16,
                   device: str | torch.device | None = None) -> np.ndarray:
    """uint8 videos -> float64 (N, 400) I3D features, ``batch_size`` clips at a time.

    ``videos_uint8``: an (N, T, H, W, 3) array/tensor or a sequence of (T, H, W, 3) clips
    (sizes may differ between clips).  Runs on ``device`` (default: where ``i3d`` lives).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else module_device(i3d)
    i3d.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(videos_uint8), batch_size):
            x = _preprocess_chunk(videos_uint8[start:start + batch_size], device)
            out.append(i3d(x).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, NUM_CLASSES))


def _warn_if_random(i3d: nn.Module) -> None:
    if not is_pretrained(i3d):
        logger.warning("this I3D does not hold the pretrained Kinetics-400 weights (see eval.fvd.is_pretrained): "
                       "the number is NOT an FVD and must not be reported as one")


def compute_fvd(real: Any, fake: Any, *, i3d: nn.Module | None = None, batch_size: int = 16,
                device: str | torch.device = "cpu") -> float:
    """FVD between two uint8 (N, T, H, W, 3) video arrays (N >= 2, T >= 9).

    ``i3d`` defaults to ``load_i3d(device=device)``; a module without the pretrained weights
    (e.g. a random-weight ``I3D()`` in tests, see ``is_pretrained``) triggers a warning that the
    result is not FVD.
    """
    if i3d is None:
        i3d = load_i3d(device=device)
    else:
        i3d = i3d.to(device)
        _warn_if_random(i3d)
    feats_real = video_features(real, i3d, batch_size, device)
    feats_fake = video_features(fake, i3d, batch_size, device)
    return frechet_distance(feats_real, feats_fake)

def _all_gather(state: Any, obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (pickled objects)."""
    return [obj] if state.num_processes == 1 else gather_object([obj])


# (clips, skipped) for a batch of item indices: clips a uint8 (B, T, H, W, 3) array or a list of
# (T, H, W, 3) arrays; skipped a list of (item index, reason) for items that could not be read.
LoadBatch = Callable[[list[int]], tuple[Any, list[tuple[int, str]]]]


def stream_stats(num_items: int, load_batch: LoadBatch, i3d: nn.Module, *, max_clips: int, batch_size: int,
                 state: Any = None, metadata: Mapping[str, Any] | None = None,
                 desc: str = "I3D") -> tuple[FeatureStats, list[tuple[int, str]]]:
    """Statistics of the I3D features of items ``0, 1, ...`` until ``max_clips`` clips were read.

    Streaming: a batch is loaded (read, decoded or generated), turned into features and added
    to a ``FeatureStats``; no more than one batch of videos is in memory.  Distributed: batch
    ``k`` (items ``k*batch_size ...``) goes to rank ``k % num_processes``, so every batch — and
    hence every feature — is the same whatever the number of processes; the per-rank
    statistics are then gathered and merged in rank order on every rank.  Items that cannot be
    read are skipped and more items are taken until ``max_clips`` clips were read or the items
    run out, exactly as a single process reading them in order would.
    """
    state = state or process_state()
    stats = FeatureStats(metadata=metadata)
    skipped: list[tuple[int, str]] = []
    next_item = 0
    with progress(total=min(num_items, max_clips), desc=desc, unit="clip") as bar:
        while stats.n < max_clips and next_item < num_items:
            stop = min(num_items, next_item + max_clips - stats.n)
            batches = [list(range(s, min(s + batch_size, stop))) for s in range(next_item, stop, batch_size)]
            mine, my_skipped = FeatureStats(metadata=metadata), []
            for batch in batches[state.process_index::state.num_processes]:
                clips, bad = load_batch(batch)
                my_skipped.extend(bad)
                if len(clips):
                    mine.update(video_features(clips, i3d, batch_size))
                bar.update(min(len(batch) * state.num_processes, bar.total - bar.n))
            for part_stats, part_skipped in _all_gather(state, (mine.to_dict(), my_skipped)):
                stats.merge(FeatureStats.from_dict(part_stats))
                skipped.extend(part_skipped)
            next_item = stop
    return stats, sorted(skipped)


def cached_stats(cache_file: Path | None, compute: Callable[[], tuple[FeatureStats, dict]],
                 state: Any = None) -> tuple[FeatureStats, dict]:
    """Statistics from ``cache_file`` when it exists, else ``compute()`` (on every rank) saved there.

    Rank 0 alone reads and writes the file and shares what it read, so ranks never disagree
    (even without a shared file system).  Returns (stats, info with ``stats_cache`` and
    ``stats_cached``, ``elapsed_s``).
    """
    state = state or process_state()
    t0 = time.perf_counter()
    if cache_file is not None:
        found = FeatureStats.load(cache_file).to_dict() if state.is_main_process and cache_file.is_file() else None
        found = _all_gather(state, found)[0]
        if found is not None:
            stats = FeatureStats.from_dict(found)
            logger.info(f"using cached real statistics {cache_file} ({stats.n} clips)")
            return stats, {"stats_cache": str(cache_file), "stats_cached": True,
                           "elapsed_s": round(time.perf_counter() - t0, 3)}
    stats, info = compute()
    if cache_file is not None and state.is_main_process:
        stats.save(cache_file)
    return stats, {"stats_cache": str(cache_file) if cache_file else None, "stats_cached": False, **info,
                   "elapsed_s": round(time.perf_counter() - t0, 3)}


def stats_cache_path(key: Mapping[str, Any], cache_dir: Path | None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return (Path(cache_dir) if cache_dir else cache_root() / "fvd_stats") / f"real_{digest}.safetensors"
