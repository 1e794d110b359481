"""Helpers for the video tests: synthetic frames, real encodes with PyAV, a reference
decoder and deliberately broken files. Independent of ``data.video`` on purpose, so the
tests check that module against plain PyAV."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def make_frames(
    num_frames: int, height: int, width: int, seed: int = 0, noise: int = 12
) -> np.ndarray:
    """uint8 (T, H, W, 3) frames that differ from each other everywhere: moving gradients,
    a per-frame blue level and uniform noise of +-``noise`` (so that a wrong frame never
    decodes equal)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:height, :width]
    frames = np.empty((num_frames, height, width, 3), dtype=np.int64)
    for t in range(num_frames):
        frames[t, ..., 0] = (x * 5 + t * 11) % 256
        frames[t, ..., 1] = (y * 7 + t * 3) % 256
        frames[t, ..., 2] = (t * 23) % 256
    frames += rng.integers(-noise, noise + 1, size=frames.shape)
    return np.clip(frames, 0, 255).astype(np.uint8)


def smooth_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (T, H, W, 3) slowly varying sinusoids: what a lossy codec reproduces closely."""
    t, y, x = np.mgrid[:num_frames, :height, :width].astype(np.float64)
    channels = [np.sin(x / 9 + t / 4), np.cos(y / 7 - t / 5), np.sin((x + y) / 11 + t / 3)]
    return np.round(128 + 90 * np.stack(channels, axis=-1)).astype(np.uint8)


def flat_frames(num_frames: int, height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of one colour."""
    return np.broadcast_to(np.array(rgb, np.uint8), (num_frames, height, width, 3)).copy()


def encode_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames with PyAV; the container follows the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, options=options or {})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def decode_all(path: str | Path) -> np.ndarray:
    """Reference: every frame of the first video stream, uint8 (T, H, W, 3) RGB."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames)


def write_random_bytes(path: str | Path, size: int = 4096, seed: int = 0) -> Path:
    path = Path(path)
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_truncated_copy(source: str | Path, path: str | Path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of ``source``'s bytes, as an interrupted copy would leave."""
    data = Path(source).read_bytes()
    path = Path(path)
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
