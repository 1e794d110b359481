"""Video clip datasets: a folder or manifest of video files -> fixed-size training clips.

``VideoClipDataset`` probes every file once at construction and skips (and lists) the
ones that cannot be used, so that a bad file never crashes an epoch. ``build_video_dataset``
builds one from a ``configs/data/*.yaml`` node.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from configs.files import atomic_write_text
from configs.logs import get_logger
from configs.schema import config_path
from data.demo import ensure_demo_videos
from data.video import (
    VIDEO_EXTENSIONS,
    VideoInfo,
    VideoReadError,
    probe_video,
    read_frames,
)

logger = get_logger(__name__)

RESIZE_MODES = ("crop", "full")
_SHOWN_SKIPS = 10  # how many skipped files a warning or error message lists


@dataclass(frozen=True)
class VideoEntry:
    """A usable video: where it is, its label (0 when unconditional), its optional
    caption, what probing found, and the clip's frame offsets from the clip start."""

    path: Path
    label: int
    caption: str | None
    info: VideoInfo
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class _Candidate:
    path: Path
    label: int | None
    caption: str | None


# --------------------------------------------------------------------------- listing files


def _is_hidden(path: Path, root: Path) -> bool:
    """Hidden files/folders (".x", macOS "._x.mp4" forks, temporary files) are ignored."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def list_video_files(root: Path) -> list[Path]:
    """Every video file under ``root`` (recursive, sorted, hidden paths excluded)."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file() and not _is_hidden(path, root)
    )


def _parse_label(value: Any, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{where}: label {value!r} is not an integer")
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{where}: label {value!r} is not an integer") from None


def _manifest_rows(manifest: Path) -> list[tuple[str, dict]]:
    """(location for messages, row dict) for every row of a .csv or .jsonl manifest."""
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        with open(manifest, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            if "path" not in header:
                raise ValueError(f"manifest {manifest} has no 'path' column (header: {header})")
            reader.fieldnames = header
            return [(f"{manifest}:{n}", row) for n, row in enumerate(reader, start=2)]
    if suffix == ".jsonl":
        rows = []
        with open(manifest, encoding="utf-8") as handle:
            for n, line in enumerate(handle, start=1):
                if line.strip():
                    row = json.loads(line)
                    if not isinstance(row, dict) or "path" not in row:
                        raise ValueError(f"{manifest}:{n}: expected an object with a 'path' key")
                    rows.append((f"{manifest}:{n}", row))
        return rows
    raise ValueError(f"manifest {manifest} must be a .csv or .jsonl file")


def _manifest_candidates(manifest: Path, root: Path) -> list[_Candidate]:
    """Rows of ``manifest`` with paths resolved against ``root``.

    Raises FileNotFoundError listing every missing file.
    """
    candidates = []
    for where, row in _manifest_rows(manifest):
        if not str(row.get("path") or "").strip():
            raise ValueError(f"{where}: empty 'path'")
        path = root / Path(str(row["path"]).strip()).expanduser()
        caption = row.get("caption") or None
        candidates.append(_Candidate(path, _parse_label(row.get("label"), where), caption))
    missing = [str(c.path) for c in candidates if not c.path.exists()]
    if missing:
        raise FileNotFoundError(
            f"manifest {manifest} names {len(missing)} missing file(s) (relative paths resolve "
            f"against {root}):\n  " + "\n  ".join(missing)
        )
    return candidates


def _folder_candidates(
    root: Path, num_classes: int
) -> tuple[list[_Candidate], list[str], list[tuple[str, str]]]:
    """(candidates, class names, skipped) for a folder of videos.

    With ``num_classes > 0`` the label is the index of the first-level sub-folder name in
    the sorted list of such names; files directly in ``root`` are skipped.
    """
    files = list_video_files(root)
    if num_classes == 0:
        return [_Candidate(path, None, None) for path in files], [], []
    class_of = {path: path.relative_to(root).parts[0] for path in files
                if len(path.relative_to(root).parts) > 1}
    classes = sorted(set(class_of.values()))
    label_of = {name: label for label, name in enumerate(classes)}
    candidates = [_Candidate(path, label_of[name], None) for path, name in class_of.items()]
    skipped = [(str(path), "not inside a class sub-folder of the root")
               for path in files if path not in class_of]
    return candidates, classes, skipped


def _check_labels(candidates: list[_Candidate], num_classes: int, classes: list[str]) -> None:
    """With ``num_classes > 0`` every label must exist and lie in [0, num_classes)."""
    if num_classes == 0:
        return
    unlabeled = [str(c.path) for c in candidates if c.label is None]
    if unlabeled:
        raise ValueError(
            f"num_classes={num_classes} but {len(unlabeled)} video(s) have no label, e.g. "
            f"{unlabeled[:3]}; add a 'label' column or set num_classes=0 (unconditional)"
        )
    bad = [(str(c.path), c.label) for c in candidates if not 0 <= c.label < num_classes]
    if bad:
        origin = f" (class folders: {classes})" if classes else ""
        raise ValueError(
            f"{len(bad)} label(s) outside [0, {num_classes}){origin}, e.g. {bad[:3]}; "
            f"set num_classes to the number of classes"
        )


# --------------------------------------------------------------------------- tensors


def frame_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of clips from ``data.resolution``: one size (square) or [height, width]."""
    if isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool):
        return int(resolution), int(resolution)
    return int(resolution[0]), int(resolution[1])


def resize_video(video: torch.Tensor, resolution: int | Sequence[int], resize_mode: str) -> torch.Tensor:
    """Resize float frames (T, C, H, W) to (T, C, height, width) of ``resolution`` (:func:`frame_size`).

    ``crop``: scale (keeping the aspect ratio) so the frame just covers the target, then take
    the centre; ``full``: scale the whole frame to the target (aspect ratio not kept).
    Bilinear with antialiasing; frames already at the target size are left untouched.
    """
    height, width = video.shape[-2:]
    target_h, target_w = frame_size(resolution)
    if resize_mode == "full":
        size = (target_h, target_w)
    else:
        scale = max(target_h / height, target_w / width)
        size = (max(target_h, round(height * scale)), max(target_w, round(width * scale)))
    if (height, width) != size:
        video = F.interpolate(video, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (size[0] - target_h) // 2, (size[1] - target_w) // 2
    return video[..., top : top + target_h, left : left + target_w]


def frames_to_tensor(frames: np.ndarray, resolution: int | Sequence[int], resize_mode: str) -> torch.Tensor:
    """uint8 RGB frames (T, H, W, 3) -> float32 (3, T, height, width) in [-1, 1] (``resolution``: see resize_video)."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W), 0..255
    video = resize_video(video, resolution, resize_mode)
    video = (video / 127.5 - 1.0).clamp_(-1.0, 1.0)
    return video.permute(1, 0, 2, 3).contiguous()


# --------------------------------------------------------------------------- dataset


class VideoClipDataset(Dataset):
    """Fixed-length clips from a folder of videos or a manifest.

    Sources: ``manifest`` (.csv with header ``path[,label][,caption]``, or .jsonl with
    those keys; relative paths resolve against ``root``, default the manifest's folder),
    else every video file under ``root`` (recursive; extensions ``VIDEO_EXTENSIONS``;
    with ``num_classes > 0`` labels come from first-level sub-folder names, sorted).

    Each item is ``num_frames`` frames, ``frame_stride`` apart, or resampled to
    ``target_fps`` frames/s when that is set. Files that cannot be probed or are too short
    are skipped and listed in ``self.skipped`` as (path, reason).

    Keys: ``index`` or ``(index, sample_seed)``. With ``random_start`` the clip start is
    drawn from ``np.random.default_rng(sample_seed)`` (``seed + index`` for a plain int
    key, so pass per-sample seeds to vary clips between epochs); otherwise the clip is
    centred. Items: ``{"video": float32 (3, T, resolution, resolution) in [-1, 1],
    "label": int64 scalar (0 when unconditional), "index": int}``, where ``index`` is the
    video actually served: a file that fails to decode at read time is recorded in
    ``self.skipped`` (of the process that read it, e.g. a DataLoader worker) and the next
    usable index is served instead.

    ``cache_mb`` > 0 keeps decoded clips (uint8) in this process's memory, up to that many
    megabytes, so a small dataset read many times over (the demo: 12 MB) is decoded once;
    clips that do not fit are decoded on every read as usual. Each DataLoader worker has
    its own cache.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        manifest: str | os.PathLike | None = None,
        *,
        num_classes: int = 0,
        num_frames: int = 16,
        frame_stride: int = 1,
        target_fps: float | None = None,
        resolution: int = 64,
        resize_mode: str = "crop",
        random_start: bool = True,
        seed: int = 0,
        cache_mb: float = 0,
    ):
        _check_options(
            num_classes=num_classes, num_frames=num_frames, frame_stride=frame_stride,
            target_fps=target_fps, resolution=resolution, resize_mode=resize_mode,
            random_start=random_start, seed=seed, cache_mb=cache_mb,
        )
        self.num_classes = num_classes
        self.num_frames = num_frames
        self.frame_stride = frame_stride
        self.target_fps = None if target_fps is None else float(target_fps)
        self.resolution = resolution
        self.resize_mode = resize_mode
        self.random_start = random_start
        self.seed = seed
        self.skipped: list[tuple[str, str]] = []
        self.classes: list[str] = []
        self._unreadable: set[int] = set()
        self._cache_limit_bytes = int(cache_mb * 2**20)
        self._cache: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}  # (index, frame indices) -> frames
        self._cache_bytes = 0

        candidates, self.source = self._list_candidates(root, manifest)
        _check_labels(candidates, num_classes, self.classes)
        self.entries = [entry for entry in map(self._probe, candidates) if entry is not None]
        if not self.entries:
            raise ValueError(self._empty_message())
        if self.skipped:
            logger.warning(self._skip_summary())

    # ----------------------------------------------------------------- construction

    def _list_candidates(self, root, manifest) -> tuple[list[_Candidate], str]:
        if manifest is not None:
            manifest = Path(manifest).expanduser()
            if not manifest.is_file():
                raise FileNotFoundError(f"manifest {manifest} does not exist")
            base = Path(root).expanduser() if root is not None else manifest.parent
            return _manifest_candidates(manifest, base), f"manifest {manifest}"
        if root is None:
            raise ValueError("VideoClipDataset needs a root folder or a manifest")
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"video folder {root} does not exist")
        candidates, self.classes, skipped = _folder_candidates(root, self.num_classes)
        self.skipped.extend(skipped)
        return candidates, f"folder {root} (extensions {', '.join(VIDEO_EXTENSIONS)})"

    def clip_offsets(self, fps: float) -> tuple[int, ...]:
        """Frame offsets of one clip from its first frame, for a source at ``fps`` frames/s."""
        step = self.frame_stride if self.target_fps is None else fps / self.target_fps
        positions = np.arange(self.num_frames) * step + 1e-6  # epsilon: 3 * (1/3) -> 1, not 0
        return tuple(int(i) for i in np.floor(positions))

    def _probe(self, candidate: _Candidate) -> VideoEntry | None:
        """A VideoEntry, or None (and a ``self.skipped`` record) when the file is unusable."""
        try:
            info = probe_video(candidate.path)
        except VideoReadError as error:
            self.skipped.append((str(candidate.path), error.reason))
            return None
        offsets = self.clip_offsets(info.fps)
        if offsets[-1] >= info.num_frames:
            self.skipped.append((str(candidate.path), self._too_short_reason(info, offsets)))
            return None
        label = candidate.label if self.num_classes > 0 else 0
        return VideoEntry(candidate.path, label, candidate.caption, info, offsets)

    def _too_short_reason(self, info: VideoInfo, offsets: tuple[int, ...]) -> str:
        sampling = (
            f"at stride {self.frame_stride}"
            if self.target_fps is None
            else f"resampled from {info.fps:g} to {self.target_fps:g} fps"
        )
        return (
            f"too short: {info.num_frames} frames, a clip of {self.num_frames} frames "
            f"{sampling} spans {offsets[-1] + 1}"
        )

    def _listed_skips(self) -> str:
        lines = [f"  {path}: {reason}" for path, reason in self.skipped[:_SHOWN_SKIPS]]
        if len(self.skipped) > _SHOWN_SKIPS:
            lines.append(f"  ... and {len(self.skipped) - _SHOWN_SKIPS} more")
        return "\n".join(lines)

    def _skip_summary(self) -> str:
        total = len(self.entries) + len(self.skipped)
        return (
            f"VideoClipDataset skipped {len(self.skipped)} of {total} video files from "
            f"{self.source} (all listed in .skipped; write_skipped_report() saves them):\n"
            + self._listed_skips()
        )

    def _empty_message(self) -> str:
        if not self.skipped:
            return f"no video files found in {self.source}"
        return (
            f"no usable videos in {self.source}: all {len(self.skipped)} file(s) were "
            f"skipped:\n{self._listed_skips()}"
        )

    def keep_captioned(self) -> None:
        """Skip (and list) every video without a caption, for caption-conditioned training."""
        missing = [entry for entry in self.entries if not (entry.caption or "").strip()]
        if not missing:
            return
        self.skipped.extend((str(entry.path), "empty caption (a text-to-video run needs one)") for entry in missing)
        self.entries = [entry for entry in self.entries if (entry.caption or "").strip()]
        if not self.entries:
            raise ValueError(f"no video of {self.source} has a caption: give a manifest (.csv or .jsonl) with a "
                             f"'caption' column (data.manifest=<file>)")
        logger.warning(self._skip_summary())

    def write_skipped_report(self, path: str | os.PathLike) -> None:
        """Write ``self.skipped`` to ``path`` atomically, one ``path<TAB>reason`` per line."""
        clean = lambda text: " ".join(str(text).split())  # noqa: E731 - no tabs/newlines
        atomic_write_text(path, "".join(f"{p}\t{clean(r)}\n" for p, r in self.skipped))

    # ----------------------------------------------------------------- items

    def __len__(self) -> int:
        return len(self.entries)

    def _parse_key(self, key) -> tuple[int, int]:
        """(index, sample_seed) from ``index`` or ``(index, sample_seed)``."""
        if isinstance(key, (tuple, list)) and len(key) == 2:
            index, sample_seed = (int(k) for k in key)
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            index, sample_seed = int(key), self.seed + int(key)
        else:
            raise TypeError(f"dataset key must be an int or (index, sample_seed), got {key!r}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} videos")
        return index, sample_seed

    def frame_indices(self, index: int, sample_seed: int) -> list[int]:
        """Source frame indices of the clip of video ``index`` for ``sample_seed``."""
        entry = self.entries[index]
        slack = entry.info.num_frames - 1 - entry.offsets[-1]  # >= 0, checked when probing
        if self.random_start:
            start = int(np.random.default_rng(sample_seed).integers(0, slack + 1))
        else:
            start = slack // 2
        return [start + offset for offset in entry.offsets]

    def __getitem__(self, key) -> dict[str, Any]:
        index, sample_seed = self._parse_key(key)
        for shift in range(len(self)):
            candidate = (index + shift) % len(self)
            if candidate in self._unreadable:
                continue
            entry = self.entries[candidate]
            try:
                frames = self._read_clip(candidate, self.frame_indices(candidate, sample_seed))
            except VideoReadError as error:
                self._mark_unreadable(candidate, error)
                continue
            return {
                "video": frames_to_tensor(frames, self.resolution, self.resize_mode),
                "label": torch.tensor(entry.label, dtype=torch.int64),
                "index": candidate,
            }
        raise RuntimeError(
            f"every video of {self.source} failed to decode; see .skipped:\n{self._listed_skips()}"
        )

    def _read_clip(self, index: int, frame_indices: list[int]) -> np.ndarray:
        """Frames (T, H, W, 3) uint8 of video ``index``: from the cache, else decoded (and cached if it fits)."""
        key = (index, tuple(frame_indices))
        frames = self._cache.get(key)
        if frames is None:
            frames = read_frames(self.entries[index].path, frame_indices)
            if self._cache_bytes + frames.nbytes <= self._cache_limit_bytes:
                self._cache[key] = frames
                self._cache_bytes += frames.nbytes
        return frames

    def _mark_unreadable(self, index: int, error: VideoReadError) -> None:
        self._unreadable.add(index)
        self.skipped.append((error.path, f"read failed: {error.reason}"))
        logger.warning(f"{error}; serving the next video instead (recorded in .skipped)")


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_positive(name: str, value: Any) -> None:
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _check_options(
    *, num_classes, num_frames, frame_stride, target_fps, resolution, resize_mode, random_start,
    seed, cache_mb,
) -> None:
    """Validate VideoClipDataset options; ValueError names the option and the valid values."""
    for name, value, minimum in [("num_classes", num_classes, 0), ("num_frames", num_frames, 1),
                                 ("frame_stride", frame_stride, 1), ("seed", seed, 0)]:
        _require_int(name, value, minimum)
    if isinstance(resolution, (int, np.integer, bool)):
        _require_int("resolution", resolution, 1)
    elif not (isinstance(resolution, (list, tuple)) and len(resolution) == 2
              and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in resolution)):
        raise ValueError(f"resolution must be a positive integer (square clips) or [height, width], got {resolution!r}")
    if target_fps is not None:
        _require_positive("target_fps", target_fps)
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    if not isinstance(random_start, bool):
        raise ValueError(f"random_start must be true or false, got {random_start!r}")
    if not isinstance(cache_mb, (int, float, np.number)) or isinstance(cache_mb, bool) or cache_mb < 0:
        raise ValueError(f"cache_mb must be a number of megabytes >= 0 (0 = no cache), got {cache_mb!r}")


# --------------------------------------------------------------------------- config

_CLIP_KEYS = ("num_classes", "num_frames", "frame_stride", "target_fps", "resolution",
              "resize_mode", "random_start")
_OPTION_KEYS = (*_CLIP_KEYS, "cache_mb")  # VideoClipDataset's options: the clips, and how they are kept
# Keys each data config may hold; num_workers is read by the DataLoader, not here.
CONFIG_KEYS = {
    "demo": ("name", "root", "num_videos", "fps", "num_workers", *_OPTION_KEYS),
    "videos": ("name", "root", "manifest", "num_workers", *_OPTION_KEYS),
}


def _checked_config(data_cfg: Mapping) -> str:
    """The config's ``name`` after checking it and its keys."""
    name = data_cfg.get("name")
    if name not in CONFIG_KEYS:
        raise ValueError(
            f"unknown data.name {name!r} for build_video_dataset; valid: "
            f"{', '.join(CONFIG_KEYS)} (pre-extracted latent shards, data.name=latents, are "
            "built by the latent dataset module, not here)"
        )
    unknown = [key for key in data_cfg if key not in CONFIG_KEYS[name]]
    if unknown:
        raise ValueError(
            f"unknown key(s) {unknown} in the data={name} config; "
            f"valid keys: {', '.join(CONFIG_KEYS[name])}"
        )
    missing = [key for key in _OPTION_KEYS if key not in data_cfg]
    if missing:  # configs/data/*.yaml are the only home of default values
        raise ValueError(f"the data={name} config lacks key(s) {missing}; see configs/data/{name}.yaml")
    if config_path(data_cfg, "root") is None:
        example = "/folder/for/demo/videos" if name == "demo" else "/path/to/videos"
        raise ValueError(f"data.root is not set: pass data.root={example}")
    return name


def build_video_dataset(data_cfg: Mapping, *, seed: int) -> VideoClipDataset:
    """A VideoClipDataset from a ``configs/data`` node (``demo`` or ``videos``).

    Checks the name, the keys and every value before any work. ``demo`` generates the
    demo videos under ``data_cfg.root`` on first use (generation seed 0, so every run sees
    the same data) and reads them through their manifest; ``videos`` reads ``root`` or
    ``manifest``. ``seed`` only drives clip sampling.
    """
    name = _checked_config(data_cfg)
    options = {key: data_cfg[key] for key in _OPTION_KEYS}
    if not isinstance(options["resolution"], (int, bool)):  # [height, width] as a plain tuple
        options["resolution"] = tuple(options["resolution"])
    options["seed"] = seed
    _check_options(**options)
    root = config_path(data_cfg, "root")
    if name == "demo":
        if not isinstance(options["resolution"], int):
            raise ValueError(f"data=demo draws square clips: data.resolution must be one integer, "
                             f"got {list(options['resolution'])}")
        _require_int("num_videos", data_cfg.get("num_videos"), 1)
        _require_positive("fps", data_cfg.get("fps"))
        manifest = ensure_demo_videos(
            root,
            num_videos=data_cfg["num_videos"],
            num_classes=options["num_classes"],
            num_frames=options["num_frames"],
            resolution=options["resolution"],
            fps=data_cfg["fps"],
        )
    else:
        manifest = config_path(data_cfg, "manifest")
    return VideoClipDataset(root, manifest, **options)
