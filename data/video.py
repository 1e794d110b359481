"""Video files in and out: probe, random-access frame reads, deterministic mp4 writes.

Reading uses decord when it is installed and known to be exact for the file, and PyAV
otherwise. Every read is bit-identical to a full PyAV decode
(``frame.to_ndarray(format="rgb24")``), which is the reference.

decord 0.6.0 is fast (it seeks instead of decoding from the start) but we measured it
to be wrong on some inputs, so ``backend="auto"`` only routes a file to decord when a
cheap PyAV header read shows an input it was measured exact on:

* codec h264 or vp9 (mpeg4 part 2 with B-frames: decord returns wrong frames after a seek);
* 8-bit yuv420p / yuvj420p / yuv422p / yuv444p (10-bit: colours differ);
* even frame height (odd heights: colours differ).

decord also raises on some widths (16, 24, 48, 72, ...); those reads fall back to PyAV.

The backend can be forced with the ``backend`` argument or the environment variable
``LINVID_VIDEO_BACKEND`` (``auto`` | ``decord`` | ``pyav``); a forced backend never falls
back, which is what tests and benchmarks want.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from configs.files import atomic_write_bytes

try:  # decord has no aarch64 wheel; PyAV alone is enough.
    import decord

    decord.logging.set_level(decord.logging.QUIET)  # failures surface as VideoReadError
except ImportError:  # pragma: no cover - depends on the platform
    decord = None

BACKEND_ENV_VAR = "LINVID_VIDEO_BACKEND"
BACKENDS = ("auto", "decord", "pyav")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")

_DECORD_EXACT_CODECS = frozenset({"h264", "vp9"})
_DECORD_EXACT_PIX_FMTS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuv444p"})

MP4_CRF = 18  # visually lossless for samples; fixed so that output bytes are reproducible


class VideoReadError(Exception):
    """A video file cannot be probed or decoded. ``str()`` names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path}: {reason}")


@dataclass(frozen=True)
class VideoInfo:
    """What a dataset needs to know about a video: frame count, rate (frames/s) and size (px)."""

    num_frames: int
    fps: float
    height: int
    width: int


# --------------------------------------------------------------------------- backends


def _resolve_backend(backend: str | None) -> str:
    """The backend to use: the argument, else ``$LINVID_VIDEO_BACKEND``, else ``auto``."""
    name = backend or os.environ.get(BACKEND_ENV_VAR) or "auto"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown video backend {name!r} (from the argument or ${BACKEND_ENV_VAR}); "
            f"valid: {', '.join(BACKENDS)}"
        )
    if name == "decord" and decord is None:
        raise ValueError("video backend 'decord' was requested but decord is not installed")
    return name


def _decord_is_exact_for(path: Path) -> bool:
    """Whether decord was measured bit-exact on this kind of stream (see module docstring)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return False
            context = container.streams.video[0].codec_context
            return (
                context.name in _DECORD_EXACT_CODECS
                and context.pix_fmt in _DECORD_EXACT_PIX_FMTS
                and context.height % 2 == 0
            )
    except Exception:  # unreadable header: let the PyAV path report the real error
        return False


def _backend_order(path: Path, backend: str | None) -> list[str]:
    """Backends to try in order for ``path``."""
    name = _resolve_backend(backend)
    if name != "auto":
        return [name]
    if decord is not None and _decord_is_exact_for(path):
        return ["decord", "pyav"]
    return ["pyav"]


def _check_file(path: Path) -> None:
    """Cheap checks that give clearer messages than any decoder."""
    if not path.exists():
        raise VideoReadError(path, "file does not exist")
    if not path.is_file():
        raise VideoReadError(path, "not a regular file")
    if path.stat().st_size == 0:
        raise VideoReadError(path, "file is empty (0 bytes)")


def _with_fallback(path: Path, backend: str | None, functions: dict, *args):
    """Return ``functions[name](path, *args)`` for the first backend that succeeds.

    A ``VideoReadError`` raised by a backend is definitive (e.g. index out of range) and is
    re-raised at once; any other exception moves on to the next backend. If all fail, the
    raised ``VideoReadError`` lists every backend's reason.
    """
    _check_file(path)
    failures = []
    for name in _backend_order(path, backend):
        try:
            return functions[name](path, *args)
        except VideoReadError:
            raise
        except Exception as error:  # decoders raise many unrelated exception types
            failures.append(f"{name}: {type(error).__name__}: {_first_line(error)}")
    raise VideoReadError(path, "; ".join(failures))


def _check_in_range(path: Path, indices: Sequence[int], num_frames: int) -> None:
    bad = sorted({i for i in indices if not 0 <= i < num_frames})
    if bad:
        raise VideoReadError(
            path, f"frame indices {bad[:8]} out of range: the video has {num_frames} frames"
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else "no message"


# --------------------------------------------------------------------------- decord


def _decord_reader(path: Path):
    return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)


def _decord_probe(path: Path) -> VideoInfo:
    reader = _decord_reader(path)
    num_frames = len(reader)
    if num_frames == 0:
        raise VideoReadError(path, "contains no video frames")
    height, width, _ = reader[0].shape  # decoding frame 0 proves the stream is decodable
    return VideoInfo(num_frames, float(reader.get_avg_fps()), int(height), int(width))


def _decord_read(path: Path, indices: list[int]) -> np.ndarray:
    reader = _decord_reader(path)
    _check_in_range(path, indices, len(reader))
    return reader.get_batch(indices).asnumpy()


# --------------------------------------------------------------------------- PyAV


@contextlib.contextmanager
def _pyav_stream(path: Path) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open ``path`` and yield (container, first video stream), single-threaded decode."""
    try:
        opened = av.open(str(path))
    except av.FFmpegError as error:
        raise VideoReadError(
            path,
            "not a readable video container (corrupt, truncated, or not a video): "
            f"{getattr(error, 'strerror', None) or error}",
        ) from error
    with opened as container:
        if not container.streams.video:
            raise VideoReadError(path, "has no video stream (audio-only or not a video file)")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        yield container, stream


def _stream_fps(path: Path, stream: av.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0:
        raise VideoReadError(path, "stream declares no frame rate")
    return float(rate)


def _pyav_probe(path: Path) -> VideoInfo:
    """Header + first frame; frame count from the header (checked against the packets
    actually present, which catches truncated files) or, when the header has none, by
    decoding every frame."""
    with _pyav_stream(path) as (container, stream):
        fps = _stream_fps(path, stream)
        declared = stream.frames
        packets = sum(1 for packet in container.demux(stream) if packet.size)
    if 0 < packets < declared:
        raise VideoReadError(
            path, f"truncated: the header declares {declared} frames but only {packets} are present"
        )
    with _pyav_stream(path) as (container, stream):
        frames = container.decode(stream)
        first = next(frames, None)
        if first is None:
            raise VideoReadError(path, "contains no decodable video frames")
        num_frames = declared if declared > 0 else 1 + sum(1 for _ in frames)
    return VideoInfo(num_frames, fps, first.height, first.width)


def _pyav_read(path: Path, indices: list[int]) -> np.ndarray:
    """Decode from the start up to the largest requested index, keeping the wanted frames."""
    wanted = set(indices)
    last = max(wanted)
    kept: dict[int, np.ndarray] = {}
    decoded = 0  # frames decoded so far = index of the next frame
    with _pyav_stream(path) as (container, stream):
        for frame in container.decode(stream):
            if decoded in wanted:
                kept[decoded] = frame.to_ndarray(format="rgb24")
            decoded += 1
            if decoded > last:
                break
    _check_in_range(path, indices, decoded)
    return np.stack([kept[i] for i in indices])


_PROBERS = {"decord": _decord_probe, "pyav": _pyav_probe}
_READERS = {"decord": _decord_read, "pyav": _pyav_read}


# --------------------------------------------------------------------------- public API


def probe_video(path: str | os.PathLike, backend: str | None = None) -> VideoInfo:
    """Frame count, frame rate and size of the first video stream of ``path``.

    Decodes the first frame to prove the file is decodable. Raises ``VideoReadError`` for
    missing, empty, truncated, non-video or undecodable files.
    """
    return _with_fallback(Path(path), backend, _PROBERS)


def read_frames(
    path: str | os.PathLike, indices: Sequence[int], backend: str | None = None
) -> np.ndarray:
    """Frames ``indices`` (any order, repeats allowed) of ``path`` as RGB.

    Returns a uint8 array of shape (len(indices), H, W, 3), bit-identical to a full PyAV
    decode. Raises ``VideoReadError`` when the file cannot be decoded or an index is out
    of range, ``ValueError`` when ``indices`` is empty.
    """
    path = Path(path)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("read_frames needs at least one frame index")
    negative = sorted({i for i in indices if i < 0})
    if negative:
        raise VideoReadError(path, f"negative frame indices {negative[:8]}")
    frames = _with_fallback(path, backend, _READERS, indices)
    return np.ascontiguousarray(frames, dtype=np.uint8)


def _validate_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(
            "frames must be a non-empty uint8 array of shape (T, H, W, 3), got "
            f"dtype {frames.dtype} shape {frames.shape}"
        )
    return frames


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row/column so that H and W are even (needed by yuv420p)."""
    _, height, width, _ = frames.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    return np.pad(frames, pad, mode="edge") if any(p[1] for p in pad) else frames


# Single-threaded x264 at a fixed CRF, without the frame-type lookahead: with it, the same frames
# encoded twice in one process could give different bytes (seen with PyAV 17-18 under CPU load).
X264_OPTIONS = {"crf": str(MP4_CRF), "threads": "1", "x264-params": "rc-lookahead=0"}


def encode_mp4(frames: np.ndarray, fps: int | float) -> bytes:
    """Encode RGB ``frames`` (uint8, (T, H, W, 3)) as the bytes of an H.264 yuv420p mp4 at ``fps`` frames/s.

    The bytes depend only on the frames, the rate and the PyAV/FFmpeg/x264 versions
    (:data:`X264_OPTIONS`, no wall-clock timestamps). The container is muxed in
    memory: muxing straight into a file gave different bytes for the same frames from one
    write to the next. yuv420p needs even sizes, so an odd height or width is padded by
    repeating the last row or column: the video then decodes to H+1 or W+1.
    """
    frames = _pad_to_even(_validate_frames(frames))
    if not fps or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    rate = Fraction(fps).limit_denominator(1001)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options=X264_OPTIONS)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = index, 1 / rate
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int | float) -> None:
    """Write RGB ``frames`` (uint8, (T, H, W, 3)) to ``path`` as an mp4 (see :func:`encode_mp4`).

    The same frames and rate always give the same bytes. The write is atomic and parent
    folders are created.
    """
    atomic_write_bytes(path, encode_mp4(frames, fps))


def tile_videos(videos: Sequence[np.ndarray], ncols: int | None = None) -> np.ndarray:
    """Tile N equal-shape videos (each uint8 (T, H, W, 3)) row-major into one grid video.

    ``ncols`` defaults to ceil(sqrt(N)). Returns uint8 (T, rows*H, ncols*W, 3); unused
    cells are black.
    """
    videos = [_validate_frames(v) for v in videos]
    if not videos:
        raise ValueError("tile_videos needs at least one video")
    shapes = {v.shape for v in videos}
    if len(shapes) != 1:
        raise ValueError(f"all videos must have the same (T, H, W, 3) shape, got {sorted(shapes)}")
    ncols = ncols or math.ceil(math.sqrt(len(videos)))
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    nrows = math.ceil(len(videos) / ncols)
    num_frames, height, width, _ = videos[0].shape
    grid = np.zeros((num_frames, nrows * height, ncols * width, 3), dtype=np.uint8)
    for cell, video in enumerate(videos):
        row, col = divmod(cell, ncols)
        grid[:, row * height : (row + 1) * height, col * width : (col + 1) * width] = video
    return grid


def write_grid_mp4(
    path: str | os.PathLike,
    videos: Sequence[np.ndarray],
    fps: int | float,
    ncols: int | None = None,
) -> None:
    """Tile equal-shape uint8 (T, H, W, 3) videos into one grid (see ``tile_videos``) and
    write it with ``write_mp4``."""
    write_mp4(path, tile_videos(videos, ncols), fps)
