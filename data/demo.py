"""The embedded demo dataset: procedurally drawn coloured shapes bouncing on a dark background.

One class per shape kind (``SHAPES``). Videos are generated once, deterministically, as
real mp4 files plus a ``manifest.csv`` (``path,label``, paths relative to the root), so
that the rest of the pipeline reads them exactly like user videos.

Cache rules: ``demo_params.json`` records the generation parameters. If it matches and
the manifest exists, nothing is done. If the parameters differ, the root is regenerated
in place (old manifest removed first, stale videos deleted). Generation holds an
exclusive ``fcntl.flock`` on ``<root>/.lock`` (``LOCK_NAME``), so concurrent callers (e.g. one per rank)
generate once and the others wait and reuse the result. Do not point two *different*
parameter sets at one root at the same time: each regeneration replaces the other's files.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from configs.files import atomic_write_text
from configs.logs import get_logger
from data.video import write_mp4

logger = get_logger(__name__)

GENERATOR_VERSION = 2  # bump when the drawing changes, so that old caches are regenerated
MANIFEST_NAME = "manifest.csv"
PARAMS_NAME = "demo_params.json"
LOCK_NAME = ".lock"
VIDEO_DIR = "videos"
BACKGROUND_RGB = (18.0, 18.0, 28.0)

# Signed distance (in pixels, negative inside) from a pixel offset (dx, dy) to a shape of
# radius r centred at the origin; y points down.
DistanceFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _box(dx, dy, half_w, half_h):
    return np.maximum(np.abs(dx) - half_w, np.abs(dy) - half_h)


def _triangle(dx, dy, r):
    """Upward isosceles triangle: apex at (0, -r), base from (-r, r) to (r, r)."""
    slant = (2 * np.abs(dx) - (dy + r)) / np.sqrt(5.0)  # distance to the slanted sides
    return np.maximum(slant, dy - r)


SHAPES: dict[str, DistanceFn] = {
    "square": lambda dx, dy, r: _box(dx, dy, r, r),
    "circle": lambda dx, dy, r: np.hypot(dx, dy) - r,
    "triangle": _triangle,
    "cross": lambda dx, dy, r: np.minimum(_box(dx, dy, r, r / 3), _box(dx, dy, r / 3, r)),
    "diamond": lambda dx, dy, r: (np.abs(dx) + np.abs(dy) - r) / np.sqrt(2.0),
    "ring": lambda dx, dy, r: np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.25 * r,
    "x": lambda dx, dy, r: np.minimum(
        _box((dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2), r, r / 3),
        _box((dx - dy) / np.sqrt(2), (dx + dy) / np.sqrt(2), r, r / 3),
    ),
    "frame": lambda dx, dy, r: np.maximum(_box(dx, dy, r, r), -_box(dx, dy, 0.55 * r, 0.55 * r)),
}
SHAPE_NAMES = tuple(SHAPES)


def _bounce(position: np.ndarray, low: float, high: float) -> np.ndarray:
    """Fold unbounded positions into [low, high] as if reflected by walls at both ends."""
    span = high - low
    folded = np.mod(position - low, 2 * span)
    return low + span - np.abs(folded - span)


def _vivid_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated, bright RGB colour (float, 0..255) from a random hue (HSV to RGB)."""
    hue, saturation, value = rng.uniform(), rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0)
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * hue) % 6.0
    return 255.0 * value * (1.0 - saturation * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def render_clip(
    shape: str, num_frames: int, resolution: int, rng: np.random.Generator
) -> np.ndarray:
    """One clip of ``shape`` moving in a straight line and bouncing off the borders.

    Colour, size, start and velocity come from ``rng``. Returns uint8
    (num_frames, resolution, resolution, 3), edges anti-aliased.
    """
    radius = resolution * rng.uniform(0.25, 0.34)  # shapes 16 to 22 pixels across at 32: 4 to 5 tokens of 4x4
    colour = _vivid_colour(rng)
    start = rng.uniform(radius, resolution - radius, size=2)
    angle = rng.uniform(0.0, 2 * np.pi)
    speed = resolution * rng.uniform(0.04, 0.10)  # pixels per frame
    velocity = speed * np.array([np.cos(angle), np.sin(angle)])
    unbounded = start + np.arange(num_frames)[:, None] * velocity  # (T, 2) as (x, y)
    centres = _bounce(unbounded, radius, resolution - radius)

    pixel = np.arange(resolution) + 0.5
    dx = pixel[None, None, :] - centres[:, 0, None, None]  # (T, 1, W)
    dy = pixel[None, :, None] - centres[:, 1, None, None]  # (T, H, 1)
    coverage = np.clip(0.5 - SHAPES[shape](dx, dy, radius), 0.0, 1.0)[..., None]  # (T, H, W, 1)
    frames = coverage * colour + (1.0 - coverage) * np.array(BACKGROUND_RGB)
    return np.round(frames).astype(np.uint8)


def _clip_shape(index: int, num_classes: int, rng: np.random.Generator) -> tuple[str, int]:
    """(shape name, label) of video ``index``: classes cycle through the first
    ``num_classes`` shapes; unconditional (0) mixes all shapes with label 0."""
    if num_classes == 0:
        return SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))], 0
    label = index % num_classes
    return SHAPE_NAMES[label], label


def _generation_params(**params) -> dict:
    num_classes = params["num_classes"]
    if not 0 <= num_classes <= len(SHAPE_NAMES):
        raise ValueError(
            f"demo num_classes must be in [0, {len(SHAPE_NAMES)}] (0 = unconditional mix), "
            f"got {num_classes}; available shapes: {', '.join(SHAPE_NAMES)}"
        )
    for key in ("num_videos", "num_frames", "resolution"):
        if params[key] < 1:
            raise ValueError(f"demo {key} must be >= 1, got {params[key]}")
    if params["fps"] <= 0:
        raise ValueError(f"demo fps must be positive, got {params['fps']}")
    return {"generator_version": GENERATOR_VERSION, **params}


def _is_complete(root: Path, params: dict) -> bool:
    try:
        recorded = json.loads((root / PARAMS_NAME).read_text())
    except (OSError, ValueError):
        return False
    return recorded == params and (root / MANIFEST_NAME).is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _generate(root: Path, params: dict) -> None:
    """Write every video, then the parameters, then the manifest (last, atomically)."""
    (root / MANIFEST_NAME).unlink(missing_ok=True)  # an interrupted run must not look complete
    (root / PARAMS_NAME).unlink(missing_ok=True)
    logger.info("Generating %d demo videos in %s", params["num_videos"], root)
    rows = []
    for index in range(params["num_videos"]):
        rng = np.random.default_rng([params["seed"], index])
        shape, label = _clip_shape(index, params["num_classes"], rng)
        relative = f"{VIDEO_DIR}/{index:05d}_{shape}.mp4"
        clip = render_clip(shape, params["num_frames"], params["resolution"], rng)
        write_mp4(root / relative, clip, params["fps"])
        rows.append((relative, label))
    keep = {root / relative for relative, _ in rows}
    for stale in (root / VIDEO_DIR).glob("*.mp4"):
        if stale not in keep:
            stale.unlink()
    atomic_write_text(root / PARAMS_NAME, json.dumps(params, indent=2, sort_keys=True) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    atomic_write_text(root / MANIFEST_NAME, buffer.getvalue())


def ensure_demo_videos(
    root: str | Path,
    *,
    num_videos: int,
    num_classes: int,
    num_frames: int,
    resolution: int,
    fps: float,
    seed: int = 0,
) -> Path:
    """Generate the demo videos under ``root`` unless already there; return the manifest path.

    Each video has exactly ``num_frames`` frames of ``resolution`` x ``resolution`` pixels
    at ``fps`` frames/s. Video ``i`` is drawn from ``np.random.default_rng([seed, i])``,
    so the same parameters always give the same files. ``num_classes`` in [0, 8];
    0 = one unlabeled mix of all shapes (label 0). See the module docstring for the cache
    and locking rules.
    """
    root = Path(root).expanduser()
    params = _generation_params(
        num_videos=int(num_videos), num_classes=int(num_classes), num_frames=int(num_frames),
        resolution=int(resolution), fps=float(fps), seed=int(seed),
    )
    if not _is_complete(root, params):
        root.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(root / LOCK_NAME):
            if not _is_complete(root, params):  # another process may have finished meanwhile
                _generate(root, params)
    return root / MANIFEST_NAME
