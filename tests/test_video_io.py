"""data/video.py against real files encoded with PyAV and a full PyAV decode as reference."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from configs.files import atomic_output_path
from data import video
from data.video import (
    VideoReadError,
    probe_video,
    read_frames,
    tile_videos,
    write_grid_mp4,
    write_mp4,
)
from tests.video_fixtures import (
    decode_all,
    encode_video,
    flat_frames,
    make_frames,
    smooth_frames,
    write_random_bytes,
    write_truncated_copy,
)

HAS_DECORD = video.decord is not None
VP9_FAST = {"deadline": "realtime", "cpu-used": "8", "g": "8"}

# name -> (codec, height, width, fps, encoder options, decord exact for this stream)
FORMATS = {
    "h264.mp4": ("libx264", 48, 64, 29.97, {"g": "8", "bf": "2"}, True),
    "h264_w48.mkv": ("libx264", 32, 48, 25, {"g": "8"}, False),  # decord raises on width 48
    "mpeg4_odd.mp4": ("mpeg4", 33, 47, 12.5, {"g": "8", "bf": "2"}, False),
    "mpeg4.avi": ("mpeg4", 40, 56, 12.5, {"g": "8", "bf": "2"}, False),
    "vp9.webm": ("libvpx-vp9", 34, 46, 29.97, VP9_FAST, True),
    "vp9_odd.webm": ("libvpx-vp9", 33, 47, 12.5, VP9_FAST, False),
}
NUM_FRAMES = 30
AUTO_AND_PYAV = ["auto", "pyav"]
DECORD_CASES = [name for name, spec in FORMATS.items() if spec[-1]]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """name -> (path, reference frames from a full PyAV decode)."""
    folder = tmp_path_factory.mktemp("formats")
    result = {}
    for seed, (name, (codec, height, width, fps, options, _)) in enumerate(FORMATS.items()):
        path = encode_video(
            folder / name, make_frames(NUM_FRAMES, height, width, seed), fps, codec, options=options
        )
        result[name] = (path, decode_all(path))
    return result


def _backend_cases():
    cases = [(name, backend) for name in FORMATS for backend in AUTO_AND_PYAV]
    if HAS_DECORD:
        cases += [(name, "decord") for name in DECORD_CASES]
    return cases


@pytest.mark.parametrize("name,backend", _backend_cases())
def test_probe_matches_full_decode(encoded, name, backend):
    path, reference = encoded[name]
    info = probe_video(path, backend=backend)
    _, height, width, fps, _, _ = FORMATS[name]
    assert info.num_frames == len(reference) == NUM_FRAMES
    assert (info.height, info.width) == (height, width) == reference.shape[1:3]
    assert info.fps == pytest.approx(fps, rel=1e-3)


@pytest.mark.parametrize("name,backend", _backend_cases())
def test_read_frames_is_bit_exact(encoded, name, backend):
    path, reference = encoded[name]
    rng = np.random.default_rng(7)
    for _ in range(3):  # unsorted, with repeats, across GOP boundaries
        indices = rng.integers(0, NUM_FRAMES, size=6).tolist() + [NUM_FRAMES - 1, 0]
        frames = read_frames(path, indices, backend=backend)
        assert frames.dtype == np.uint8 and frames.flags.c_contiguous
        np.testing.assert_array_equal(frames, reference[indices])


@pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")
def test_environment_variable_forces_backend(encoded, monkeypatch):
    path, reference = encoded["h264_w48.mkv"]
    monkeypatch.setenv(video.BACKEND_ENV_VAR, "decord")
    with pytest.raises(VideoReadError, match="decord"):
        read_frames(path, [0])  # decord alone cannot read width 48 and there is no fallback
    monkeypatch.setenv(video.BACKEND_ENV_VAR, "pyav")
    np.testing.assert_array_equal(read_frames(path, [3, 1]), reference[[3, 1]])
    monkeypatch.setenv(video.BACKEND_ENV_VAR, "ffmpeg")
    with pytest.raises(ValueError, match="auto, decord, pyav"):
        probe_video(path)


class _FrameReads(Dataset):
    """Reads frames [i, i+3, i+1] of one file per item."""

    def __init__(self, path, backend):
        self.path, self.backend = path, backend

    def __len__(self):
        return NUM_FRAMES - 3

    def __getitem__(self, i):
        return torch.from_numpy(read_frames(self.path, [i, i + 3, i + 1], backend=self.backend))


@pytest.mark.parametrize("name", ["h264.mp4", "mpeg4_odd.mp4"])
@pytest.mark.parametrize("backend", AUTO_AND_PYAV)
def test_reads_in_dataloader_workers_are_bit_exact(encoded, name, backend):
    path, reference = encoded[name]
    loader = DataLoader(_FrameReads(path, backend), batch_size=4, num_workers=2)
    batches = torch.cat(list(loader)).numpy()
    expected = np.stack([reference[[i, i + 3, i + 1]] for i in range(NUM_FRAMES - 3)])
    np.testing.assert_array_equal(batches, expected)


# --------------------------------------------------------------------------- broken files


def _broken_file(kind, folder, good_mp4):
    path = folder / f"{kind}.mp4"
    if kind == "empty":
        path.touch()
    elif kind == "random_bytes":
        write_random_bytes(path)
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated":  # moov box at the end: the index is missing
        write_truncated_copy(good_mp4, path)
    elif kind == "truncated_faststart":  # index present, half of the frames missing
        source = encode_video(
            folder / "faststart_source.mp4", make_frames(24, 32, 32), 25,
            options={"g": "6"}, container_options={"movflags": "+faststart"},
        )
        write_truncated_copy(source, path)
    elif kind == "missing":
        pass
    return path


BROKEN_KINDS = ["empty", "random_bytes", "text", "truncated", "truncated_faststart", "missing"]


@pytest.mark.parametrize("backend", AUTO_AND_PYAV + (["decord"] if HAS_DECORD else []))
@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_files_raise_video_read_error(tmp_path, encoded, kind, backend):
    path = _broken_file(kind, tmp_path, encoded["h264.mp4"][0])
    with pytest.raises(VideoReadError) as caught:
        probe_video(path, backend=backend)
    assert str(path) in str(caught.value) and caught.value.reason
    with pytest.raises(VideoReadError):
        read_frames(path, list(range(24)), backend=backend)


@pytest.mark.parametrize("backend", AUTO_AND_PYAV + (["decord"] if HAS_DECORD else []))
def test_out_of_range_indices_raise(encoded, backend):
    path, _ = encoded["h264.mp4"]
    with pytest.raises(VideoReadError, match="out of range"):
        read_frames(path, [0, NUM_FRAMES], backend=backend)
    with pytest.raises(VideoReadError, match="negative"):
        read_frames(path, [-1], backend=backend)
    with pytest.raises(ValueError, match="at least one"):
        read_frames(path, [], backend=backend)


def test_reasons_are_specific(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(VideoReadError, match=r"empty \(0 bytes\)"):
        probe_video(empty)
    with pytest.raises(VideoReadError, match="does not exist"):
        probe_video(tmp_path / "nope.mp4")


# --------------------------------------------------------------------------- writing


def test_write_mp4_is_deterministic_and_round_trips(tmp_path):
    frames = smooth_frames(12, 32, 48)
    first, second = tmp_path / "a" / "clip.mp4", tmp_path / "b" / "nested" / "clip.mp4"
    write_mp4(first, frames, fps=12.5)
    write_mp4(second, frames, fps=12.5)
    assert first.read_bytes() == second.read_bytes()
    # Many writes in one process, to many paths and in memory: always the same bytes.
    for i in range(6):
        write_mp4(tmp_path / f"again_{i}" / "clip.mp4", frames, fps=12.5)
        assert (tmp_path / f"again_{i}" / "clip.mp4").read_bytes() == first.read_bytes()
    assert video.encode_mp4(frames, 12.5) == first.read_bytes()

    info = probe_video(first)
    assert (info.num_frames, info.height, info.width) == (12, 32, 48)
    assert info.fps == pytest.approx(12.5)
    decoded = decode_all(first)
    assert np.abs(decoded.astype(int) - frames).mean() < 5  # lossy: measured 3.6, most of it from
    # the yuv420p -> rgb24 conversion of the reference decoder itself
    assert sorted(p.name for p in first.parent.iterdir()) == ["clip.mp4"]  # no temp files left


def test_write_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = flat_frames(5, 33, 47, (200, 40, 90))
    path = tmp_path / "odd.mp4"
    write_mp4(path, frames, fps=8)
    decoded = decode_all(path)
    assert decoded.shape == (5, 34, 48, 3)
    assert np.abs(decoded.astype(int) - (200, 40, 90)).max() <= 4  # padding repeats the edge


def test_write_mp4_rejects_bad_frames_and_keeps_old_file(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(path, flat_frames(3, 16, 16, (10, 20, 30)), fps=8)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(path, np.zeros((3, 16, 16, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(path, flat_frames(3, 16, 16, (0, 0, 0)), fps=0)
    assert path.read_bytes() == before


def test_atomic_output_path_leaves_target_untouched_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output_path(target) as temporary:
            temporary.write_text("half-written")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_grid_tiles_videos_row_major(tmp_path):
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250)]
    videos = [flat_frames(4, 16, 16, c) for c in colours]
    grid = tile_videos(videos, ncols=3)
    assert grid.shape == (4, 32, 48, 3)
    assert (grid[:, 16:, 32:] == 0).all()  # the sixth cell is empty
    path = tmp_path / "grid.mp4"
    write_grid_mp4(path, videos, fps=8, ncols=3)
    decoded = decode_all(path).astype(int)
    assert decoded.shape == (4, 32, 48, 3)
    for cell, colour in enumerate(colours):
        row, col = divmod(cell, 3)
        centre = decoded[:, row * 16 + 8, col * 16 + 8]
        assert np.abs(centre - colour).max() <= 8
    assert tile_videos(videos[:4]).shape == (4, 32, 32, 3)  # default: ceil(sqrt(4)) = 2 columns
    with pytest.raises(ValueError, match="same"):
        tile_videos([videos[0], flat_frames(4, 8, 8, (0, 0, 0))])
