"""Clip sources for FVD statistics: video folders, a run's training split, latent directories, a model.

Each source yields uint8 clips (B, T, H, W, 3) for :func:`eval.fvd.features.stream_stats`;
real statistics are cached on disk, keyed by the source, the protocol and the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from configs.logs import get_logger
from configs.schema import data_identity
from data.datasets import frame_size, list_video_files
from data.latents import (
    MANIFEST_NAME,
    LatentDataset,
    describe_vae,
    read_manifest,
    same_vae,
)
from data.training_data import TrainingData
from data.vae import build_vae
from data.video import VideoReadError, probe_video, read_frames
from dit.sampling import generate_videos, videos_to_uint8
from eval.fvd.features import (
    LoadBatch,
    cached_stats,
    module_device,
    stats_cache_path,
    stream_stats,
)
from eval.fvd.protocol import DEFAULT_MAX_CLIPS, FVDError, Protocol, checkpoint_protocol
from eval.fvd.stats import FeatureStats
from eval.fvd.weights import check_weights, sha256_file
from eval.generation import cycle_labels, generation_seed

logger = get_logger(__name__)

def list_videos(folder: str | Path) -> list[Path]:
    """Video files under ``folder`` (recursive, sorted, hidden paths excluded; ``data.video.VIDEO_EXTENSIONS``).

    The same listing as the training datasets use (``data.datasets``).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} does not exist or is not a directory")
    return list_video_files(folder)


def read_clip(path: str | Path, num_frames: int, stride: int = 1) -> np.ndarray:
    """The first ``num_frames`` frames at ``stride`` -> uint8 (T, H, W, 3) RGB (``data.video.read_frames``).

    Raises ``VideoReadError`` if the file cannot be decoded or is too short.
    """
    available = probe_video(path).num_frames
    needed = (num_frames - 1) * stride + 1
    if available < needed:
        raise VideoReadError(path, f"too short: only {-(-available // stride)} frames at stride {stride}, "
                                   f"need {num_frames}")
    return read_frames(path, range(0, needed, stride))


def _file_loader(files: Sequence[Path], protocol: Protocol) -> LoadBatch:
    def load(indices: list[int]) -> tuple[list[np.ndarray], list[tuple[int, str]]]:
        clips, skipped = [], []
        for i in indices:
            try:
                clips.append(read_clip(files[i], protocol.num_frames, protocol.stride))
            except VideoReadError as e:
                logger.warning(f"skipping {files[i]}: {e.reason}")
                skipped.append((i, str(files[i])))
        return clips, skipped

    return load


def folder_stats(folder: str | Path, i3d: nn.Module, protocol: Protocol, batch_size: int,
                 metadata: Mapping[str, Any] | None = None, state: Any = None) -> tuple[FeatureStats, list[str]]:
    """I3D statistics of the first ``protocol.max_clips`` readable clips of a folder; (stats, skipped files)."""
    files = list_videos(folder)
    stats, skipped = stream_stats(len(files), _file_loader(files, protocol), i3d, max_clips=protocol.max_clips,
                                  batch_size=batch_size, state=state, metadata=metadata,
                                  desc=f"I3D {Path(folder).name}")
    if stats.n < 2:
        raise FVDError(f"only {stats.n} readable clips of {protocol.num_frames} frames (stride "
                       f"{protocol.stride}) in {folder} ({len(files)} video files, {len(skipped)} skipped)")
    return stats, [path for _, path in skipped]


def real_stats_cache_path(folder: Path, protocol: Protocol, weights_sha256: str,
                          cache_dir: Path | None = None) -> Path:
    """Cache file for a real folder's statistics, keyed by folder, its files, protocol and weights."""
    files = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in list_videos(folder)]
    return stats_cache_path({"folder": str(folder.resolve()), "files": files, "protocol": asdict(protocol),
                        "weights_sha256": weights_sha256}, cache_dir)


def real_folder_stats(folder: Path, i3d: nn.Module, protocol: Protocol, batch_size: int, split: str,
                      cache_dir: Path | None = None, use_cache: bool = True,
                      state: Any = None) -> tuple[FeatureStats, dict]:
    """Real statistics, re-used from disk when folder, files, protocol and weights are unchanged."""
    folder = Path(folder)
    cache = real_stats_cache_path(folder, protocol, i3d.weights_sha256, cache_dir) if use_cache else None

    def compute() -> tuple[FeatureStats, dict]:
        meta = {"folder": str(folder.resolve()), "split": split, **asdict(protocol),
                "weights_sha256": i3d.weights_sha256}
        stats, skipped = folder_stats(folder, i3d, protocol, batch_size, meta, state)
        stats.metadata.update(clips=stats.n, skipped=len(skipped))
        return stats, {}

    stats, info = cached_stats(cache, compute, state)
    return stats, {**info, "skipped": stats.metadata.get("skipped", 0)}

def _uint8_clips(videos: torch.Tensor, num_frames: int) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> (B, num_frames, H, W, 3) uint8, quantised as generated videos are."""
    if videos.shape[2] < num_frames:
        raise FVDError(f"clips have {videos.shape[2]} frames, the protocol needs {num_frames}")
    return videos_to_uint8(videos[:, :, :num_frames])


@dataclass
class ClipSource:
    """Real clips to take statistics of: ``load(indices)`` -> (uint8 clips, skipped), a cache key, a description."""

    num_items: int
    load: LoadBatch
    key: dict
    description: str


def _latent_source(dataset: LatentDataset, vae: Any, num_frames: int, what: str) -> ClipSource:
    order = _order(len(dataset))

    def load(indices: list[int]) -> tuple[np.ndarray, list]:
        latents = torch.stack([dataset[int(order[i])]["latents"] for i in indices])  # decode() moves them
        return _uint8_clips(vae.decode(latents), num_frames), []

    key = {"kind": "latents", "manifest_sha256": sha256_file(dataset.root / MANIFEST_NAME),
           "vae": vae.identity_key(), "order": "permutation(seed 0)"}
    return ClipSource(len(dataset), load, key,
                      f"{what}: pre-extracted latents {dataset.root} ({len(dataset)} clips) decoded by the "
                      f"{vae.identity_key().get('name')} VAE, first {num_frames} frames")


def _order(n: int) -> np.ndarray:
    """Fixed order in which real clips are taken (a seeded permutation, so a max_clips subset is unbiased)."""
    return np.random.default_rng(0).permutation(n)


def training_clip_source(run_cfg: Any, vae: Any, num_frames: int) -> ClipSource:
    """The run's training split as real clips (:class:`data.training_data.TrainingData`).

    Video data: one centred clip per video, with the run's frame sampling, resolution and
    resize mode, quantised to uint8 like generated videos. ``data=latents``: the latents
    decoded by the run's VAE. Clips are taken in a fixed seeded order; the first
    ``num_frames`` frames of each are used.
    """
    data = TrainingData.of_run(run_cfg)
    dataset = data.dataset(centred=True)
    if data.is_latents:
        return _latent_source(dataset, vae, num_frames, "training split")
    order = _order(len(dataset))

    def load(indices: list[int]) -> tuple[np.ndarray, list]:
        videos = data.real_videos(dataset, [int(order[i]) for i in indices], vae)
        return _uint8_clips(videos, num_frames), []

    settings = data_identity(data.clip_settings())
    files = [(str(e.path), e.path.stat().st_size, e.path.stat().st_mtime_ns) for e in dataset.entries]
    key = {"kind": "training split", "data": settings, "files": files, "order": "permutation(seed 0)"}
    height, width = frame_size(settings["resolution"])
    description = (f"training split: {data.describe(dataset)}, one centred clip each as the run sees it "
                   f"({height}x{width}, resize_mode={settings.get('resize_mode', 'crop')}), first {num_frames} frames")
    return ClipSource(len(dataset), load, key, description)


def latent_dir_clip_source(root: Path, run_vae: Any, num_frames: int, device: Any) -> ClipSource:
    """Real clips from a latent directory, decoded with the VAE its manifest records."""
    made_by = read_manifest(root)["vae"]
    vae = run_vae
    if not same_vae(made_by, run_vae.identity_key()):
        vae = build_vae({k: made_by[k] for k in ("name", "path") if made_by.get(k)}, device=device)
        if not same_vae(made_by, vae.identity_key()):
            raise FVDError(f"cannot decode the latents in {root}: they were made by {describe_vae(made_by)}, and "
                           f"the VAE at that path is now {describe_vae(vae.identity_key())}")
    return _latent_source(LatentDataset(root), vae, num_frames, "latent directory")


def source_stats(source: ClipSource, i3d: nn.Module, protocol: Protocol, batch_size: int, *, state: Any = None,
                 cache_dir: Path | None = None, use_cache: bool = True) -> tuple[FeatureStats, dict]:
    """Cached statistics of up to ``protocol.max_clips`` clips of a source (key: source, protocol, weights)."""
    key = {**source.key, "protocol": asdict(protocol), "weights_sha256": i3d.weights_sha256}
    cache = stats_cache_path(key, cache_dir) if use_cache else None

    def compute() -> tuple[FeatureStats, dict]:
        meta = {"source": source.description, **asdict(protocol), "weights_sha256": i3d.weights_sha256}
        stats, skipped = stream_stats(source.num_items, source.load, i3d, max_clips=protocol.max_clips,
                                      batch_size=batch_size, state=state, metadata=meta, desc="I3D real")
        if stats.n < 2:
            raise FVDError(f"only {stats.n} real clips in the {source.description}; need at least 2")
        stats.metadata.update(clips=stats.n, skipped=len(skipped))
        return stats, {}

    stats, info = cached_stats(cache, compute, state)
    return stats, {**info, "skipped": stats.metadata.get("skipped", 0)}


def training_real_stats(run_cfg: Any, vae: Any, i3d: nn.Module, state: Any = None, *, num_frames: int | None = None,
                        max_clips: int = DEFAULT_MAX_CLIPS, batch_size: int = 16, cache_dir: Path | None = None,
                        use_cache: bool = True) -> tuple[FeatureStats, dict]:
    """(stats, info) of the run's training split under ``checkpoint_protocol``; cached on disk.

    The same cache as ``python -m eval.fvd checkpoint=...`` with the same protocol, so the
    statistics are computed once per (data, protocol, weights).
    """
    protocol = checkpoint_protocol(run_cfg, num_frames, max_clips)
    source = training_clip_source(run_cfg, vae, protocol.num_frames)
    stats, info = source_stats(source, i3d, protocol, batch_size, state=state, cache_dir=cache_dir,
                               use_cache=use_cache)
    return stats, {**info, "description": source.description}


def generated_stats(model: nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], i3d: nn.Module, *,
                    num_samples: int, num_frames: int, steps: int, cfg_scale: float, seed: int, shift: float,
                    labels: Sequence[int] | None, batch_size: int, state: Any = None,
                    metadata: Mapping[str, Any] | None = None) -> FeatureStats:
    """I3D statistics of ``num_samples`` videos sampled from ``model`` (``dit.sampling.generate_videos``).

    Sample ``i`` starts from the noise of ``generation_seed(seed, i)`` with label ``labels[i]``, so
    the result does not depend on the number of processes; each rank generates its batches,
    turns them into features and drops the videos before the next batch.
    """
    device = module_device(model)

    def load(indices: list[int]) -> tuple[np.ndarray, list]:
        videos = generate_videos(model, decode, seeds=[generation_seed(seed, i) for i in indices],
                                 labels=[labels[i] for i in indices] if labels else None, steps=steps,
                                 cfg_scale=cfg_scale, shift=shift, batch_size=len(indices), device=device)
        if videos.shape[1] < num_frames:
            raise FVDError(f"generated videos have {videos.shape[1]} frames, the protocol needs {num_frames}")
        return videos[:, :num_frames], []

    stats, _ = stream_stats(num_samples, load, i3d, max_clips=num_samples, batch_size=batch_size, state=state,
                            metadata=metadata, desc="generate + I3D")
    return stats


def fvd_of_model(model: nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], run_cfg: Any, *,
                 num_samples: int, steps: int, cfg_scale: float, seed: int, i3d: nn.Module,
                 real_stats: FeatureStats, state: Any = None, batch_size: int | None = None,
                 allow_unverified_weights: bool = False) -> float:
    """FVD of ``model`` (e.g. the EMA during training) against ``real_stats`` from ``training_real_stats``.

    Generates ``num_samples`` videos with labels cycling over the run's classes, split across
    the processes of ``state`` (an ``Accelerator`` or ``PartialState``; all ranks must call
    this), and returns the same float on every rank.  The frame count comes from
    ``real_stats.metadata``.  Raises FVDError for I3D weights that are not pretrained.
    FVD with n samples is biased upward by ~1/n: only compare values computed with the same n.
    """
    check_weights(i3d, allow_unverified_weights)
    if num_samples < 2:
        raise FVDError(f"num_samples={num_samples}: FVD needs at least 2 generated videos")
    fake = generated_stats(
        model, decode, i3d, num_samples=num_samples, num_frames=int(real_stats.metadata["num_frames"]), steps=steps,
        cfg_scale=cfg_scale, seed=seed, shift=float(run_cfg.train.time_shift),
        labels=cycle_labels(None, num_samples, int(run_cfg.data.num_classes)),
        batch_size=batch_size or int(run_cfg.train.batch_size), state=state)
    return real_stats.frechet_distance(fake)
