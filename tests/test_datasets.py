"""data/datasets.py and data/demo.py on real video files written to temporary folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from data.datasets import (
    VideoClipDataset,
    build_video_dataset,
    frames_to_tensor,
    resize_video,
)
from data.demo import SHAPE_NAMES, ensure_demo_videos
from data.video import probe_video, read_frames
from tests.paths import CONFIG_DIR, REPO_ROOT
from tests.video_fixtures import (
    encode_video,
    flat_frames,
    make_frames,
    write_random_bytes,
    write_truncated_copy,
)

DEMO_ARGS = dict(num_videos=6, num_classes=3, num_frames=5, resolution=16, fps=8)


def _good_video(path, num_frames=24, height=32, width=32, fps=25, codec="libx264", seed=0):
    return encode_video(path, make_frames(num_frames, height, width, seed), fps, codec)


def _clip(**overrides):
    """Dataset keyword arguments for clips at the videos' native 32 x 32 size."""
    return dict(num_frames=4, resolution=32, resize_mode="full", random_start=False) | overrides


# --------------------------------------------------------------------------- skipping


@pytest.fixture
def messy_folder(tmp_path):
    """Three good videos in three formats plus five unusable files and ignored extras."""
    root = tmp_path / "videos"
    good = [
        _good_video(root / "a.mp4"),
        _good_video(root / "nested" / "b.webm", codec="libvpx-vp9", seed=1),
        _good_video(root / "c.avi", codec="mpeg4", seed=2),
    ]
    unreadable = "not a readable video container"
    bad = {
        "corrupt.mp4": unreadable,
        "empty.mp4": "empty",
        "truncated.mp4": unreadable,
        "notes.mp4": unreadable,
        "short.mp4": "too short: 3 frames",
    }
    write_random_bytes(root / "corrupt.mp4")
    (root / "empty.mp4").touch()
    write_truncated_copy(good[0], root / "truncated.mp4")
    (root / "notes.mp4").write_text("shopping list\n" * 40)
    _good_video(root / "short.mp4", num_frames=3)
    (root / "README.txt").write_text("not a video extension: ignored")
    write_random_bytes(root / "._a.mp4")  # hidden (macOS fork): ignored
    return root, good, bad


def test_unusable_files_are_skipped_counted_and_reported(messy_folder, tmp_path, caplog):
    root, good, bad = messy_folder
    dataset = VideoClipDataset(root, **_clip())
    assert "skipped 5 of 8 video files" in caplog.text
    assert sorted(e.path for e in dataset.entries) == sorted(good)
    reasons = {os.path.basename(path): reason for path, reason in dataset.skipped}
    assert sorted(reasons) == sorted(bad)
    for name, expected in bad.items():
        assert expected in reasons[name]

    report = tmp_path / "reports" / "skipped.tsv"
    dataset.write_skipped_report(report)
    lines = report.read_text().splitlines()
    assert len(lines) == 5 and all(line.count("\t") == 1 for line in lines)
    assert {os.path.basename(line.split("\t")[0]) for line in lines} == set(bad)

    items = [dataset[i] for i in range(len(dataset))]
    assert [item["index"] for item in items] == [0, 1, 2]
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2))
    assert sum(len(batch["index"]) for batch in batches) == 3


def test_read_time_failure_serves_next_video(tmp_path, caplog):
    paths = [_good_video(tmp_path / f"{i}.mp4", seed=i) for i in range(3)]
    dataset = VideoClipDataset(tmp_path, **_clip())
    write_random_bytes(paths[1])  # the file breaks after it was probed
    item = dataset[1]
    assert "serving the next video" in caplog.text
    assert item["index"] == 2
    assert dataset.skipped == [(str(paths[1]), dataset.skipped[0][1])]
    assert "read failed" in dataset.skipped[0][1]
    assert [dataset[i]["index"] for i in range(3)] == [0, 2, 2]  # no second warning needed


def test_cached_clips_are_decoded_once_within_the_budget(tmp_path):
    paths = [_good_video(tmp_path / f"{i}.mp4", seed=i) for i in range(3)]
    clip_mb = 4 * 32 * 32 * 3 / 2**20  # one decoded 4-frame clip
    cached = VideoClipDataset(tmp_path, **_clip(cache_mb=2.5 * clip_mb))  # room for two clips, not three
    uncached = VideoClipDataset(tmp_path, **_clip())
    first = [cached[i]["video"] for i in range(3)]
    for path in paths:
        write_random_bytes(path)  # every file breaks after its first read
    again = [cached[i] for i in range(2)]
    assert [item["index"] for item in again] == [0, 1] and not cached.skipped
    assert all(torch.equal(item["video"], video) for item, video in zip(again, first))
    assert torch.equal(cached[0]["video"], first[0])  # a served clip is not changed by its reader
    assert cached[2]["index"] == 0  # clip 2 did not fit: read from its broken file, the next one served
    assert [path for path, _ in cached.skipped] == [str(paths[2])]
    with pytest.raises(RuntimeError, match="failed to decode"):  # cache_mb=0: every read decodes
        uncached[0]
    with pytest.raises(ValueError, match=r"cache_mb must be a number of megabytes >= 0 \(0 = no cache\), got -1"):
        VideoClipDataset(tmp_path, **_clip(cache_mb=-1))


def test_nothing_usable_raises_with_what_was_searched(tmp_path):
    (tmp_path / "empty.mp4").touch()
    with pytest.raises(ValueError, match=r"(?s)no usable videos in folder .*empty\.mp4: file is empty"):
        VideoClipDataset(tmp_path, **_clip())
    empty_dir = tmp_path / "nothing"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="no video files found in folder"):
        VideoClipDataset(empty_dir, **_clip())


# --------------------------------------------------------------------------- manifests, labels


def test_manifest_with_missing_files_lists_all_of_them(tmp_path):
    _good_video(tmp_path / "present.mp4")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,label\npresent.mp4,0\ngone_1.mp4,1\nsub/gone_2.mp4,0\n")
    with pytest.raises(FileNotFoundError) as caught:
        VideoClipDataset(tmp_path, manifest, num_classes=2, **_clip())
    assert "gone_1.mp4" in str(caught.value) and "gone_2.mp4" in str(caught.value)
    assert "present.mp4" not in str(caught.value)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifest_labels_and_captions(tmp_path, fmt):
    data = tmp_path / "data"
    rows = [("x/one.mp4", 2, "a red square"), ("two.mp4", 0, "a blue circle")]
    for seed, (path, _, _) in enumerate(rows):
        _good_video(data / path, seed=seed)
    manifest = tmp_path / f"list.{fmt}"
    if fmt == "csv":
        manifest.write_text("path,label,caption\n" + "".join(f"{p},{l},{c}\n" for p, l, c in rows))
    else:
        manifest.write_text("".join(json.dumps(dict(path=p, label=l, caption=c)) + "\n" for p, l, c in rows))
    dataset = VideoClipDataset(data, manifest, num_classes=3, **_clip())
    assert [e.caption for e in dataset.entries] == ["a red square", "a blue circle"]
    labels = [dataset[i]["label"] for i in range(2)]
    assert all(label.dtype == torch.int64 and label.ndim == 0 for label in labels)
    assert [int(label) for label in labels] == [2, 0]

    unconditional = VideoClipDataset(data, manifest, num_classes=0, **_clip())
    assert [int(unconditional[i]["label"]) for i in range(2)] == [0, 0]
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        VideoClipDataset(data, manifest, num_classes=2, **_clip())


def test_manifest_without_labels_needs_num_classes_zero(tmp_path):
    _good_video(tmp_path / "a.mp4")
    manifest = tmp_path / "list.csv"
    manifest.write_text("path\na.mp4\n")
    assert len(VideoClipDataset(tmp_path, manifest, **_clip())) == 1
    with pytest.raises(ValueError, match="no label"):
        VideoClipDataset(tmp_path, manifest, num_classes=2, **_clip())
    bad = tmp_path / "bad.csv"
    bad.write_text("file,label\na.mp4,0\n")
    with pytest.raises(ValueError, match="no 'path' column"):
        VideoClipDataset(tmp_path, bad, **_clip())


def test_labels_from_sorted_subfolders(tmp_path, caplog):
    _good_video(tmp_path / "dogs" / "d1.mp4")
    _good_video(tmp_path / "cats" / "c1.mp4", seed=1)
    _good_video(tmp_path / "dogs" / "puppies" / "d2.mp4", seed=2)
    _good_video(tmp_path / "loose.mp4", seed=3)
    dataset = VideoClipDataset(tmp_path, num_classes=2, **_clip())
    assert "skipped 1 of 4" in caplog.text
    assert dataset.classes == ["cats", "dogs"]
    labels = {e.path.name: int(dataset[i]["label"]) for i, e in enumerate(dataset.entries)}
    assert labels == {"c1.mp4": 0, "d1.mp4": 1, "d2.mp4": 1}
    assert "class sub-folder" in dataset.skipped[0][1]
    with pytest.raises(ValueError, match=r"outside \[0, 1\).*cats"):
        VideoClipDataset(tmp_path, num_classes=1, **_clip())


# --------------------------------------------------------------------------- clip sampling


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """40 frames, 32 x 32, 25 fps."""
    return _good_video(tmp_path_factory.mktemp("long") / "long.mp4", num_frames=40)


def _expected(path, indices):
    return frames_to_tensor(read_frames(path, indices), 32, "full")


def test_centred_clip_at_stride(long_video):
    dataset = VideoClipDataset(long_video.parent, **_clip(frame_stride=3))
    # span (4 - 1) * 3 + 1 = 10 frames, slack 30, centred start 15
    assert dataset.frame_indices(0, sample_seed=123) == [15, 18, 21, 24]
    video = dataset[0]["video"]
    assert video.shape == (3, 4, 32, 32) and video.dtype == torch.float32
    assert torch.equal(video, _expected(long_video, [15, 18, 21, 24]))  # no resize: exact


def test_target_fps_resamples_from_source_rate(long_video):
    dataset = VideoClipDataset(long_video.parent, **_clip(target_fps=10))
    # 25 -> 10 fps: a step of 2.5 source frames, offsets [0, 2, 5, 7]; slack 32, start 16
    assert dataset.frame_indices(0, sample_seed=0) == [16, 18, 21, 23]
    assert torch.equal(dataset[0]["video"], _expected(long_video, [16, 18, 21, 23]))
    too_slow = dict(num_frames=20, target_fps=5)  # needs (20 - 1) * 5 + 1 = 96 frames
    with pytest.raises(ValueError, match=r"too short: 40 frames.*resampled from 25 to 5 fps"):
        VideoClipDataset(long_video.parent, **_clip(**too_slow))


def test_random_start_is_deterministic_per_key(long_video):
    kwargs = _clip(random_start=True, seed=5)
    dataset, again = VideoClipDataset(long_video.parent, **kwargs), VideoClipDataset(long_video.parent, **kwargs)
    assert torch.equal(dataset[(0, 1234)]["video"], again[(0, 1234)]["video"])
    assert torch.equal(dataset[0]["video"], dataset[(0, 5)]["video"])  # int key: seed + index
    starts = {dataset.frame_indices(0, s)[0] for s in range(50)}
    assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 36
    rng_start = int(np.random.default_rng(77).integers(0, 37))
    assert torch.equal(dataset[(0, 77)]["video"], _expected(long_video, [rng_start + i for i in range(4)]))
    with pytest.raises(IndexError):
        dataset[1]
    with pytest.raises(TypeError):
        dataset["0"]


@pytest.mark.parametrize("mode", ["crop", "full"])
def test_resize_modes_shape_and_content(tmp_path, mode):
    # 32 x 64 frames: black left eighth, white elsewhere
    frames = flat_frames(6, 32, 64, (255, 255, 255))
    frames[:, :, :8] = 0
    encode_video(tmp_path / "wide.mp4", frames, 25)
    dataset = VideoClipDataset(tmp_path, num_frames=6, resolution=16, resize_mode=mode, random_start=False)
    video = dataset[0]["video"]
    assert video.shape == (3, 6, 16, 16) and video.min() >= -1 and video.max() <= 1
    left_column = video[:, :, :, 0].mean().item()
    if mode == "crop":  # centre square = source columns 16..48: all white
        assert left_column > 0.9
    else:  # whole frame squeezed: the black stripe is still there
        assert left_column < -0.9


def test_resize_video_exact_shapes():
    tall = torch.rand(2, 3, 40, 20)
    assert resize_video(tall, 10, "crop").shape == (2, 3, 10, 10)
    assert resize_video(tall, 30, "full").shape == (2, 3, 30, 30)
    assert torch.equal(resize_video(tall[..., :20, :], 20, "crop"), tall[..., :20, :])
    # [height, width]: a wide target from a tall source covers it and crops the middle rows
    assert resize_video(tall, (6, 12), "crop").shape == (2, 3, 6, 12)
    assert resize_video(tall, (6, 12), "full").shape == (2, 3, 6, 12)
    assert torch.equal(resize_video(tall, (20, 20), "crop"), tall[..., 10:30, :])


def test_non_square_clips_from_height_and_width(tmp_path):
    _good_video(tmp_path / "a.mp4")
    dataset = VideoClipDataset(tmp_path, num_frames=4, resolution=(16, 24), random_start=False)
    assert dataset[0]["video"].shape == (3, 4, 16, 24)
    for bad in ((16,), (16, 0), "16", (16, 24, 3), (16.0, 24)):
        with pytest.raises(ValueError, match="resolution must be a positive integer .* or \\[height, width\\]"):
            VideoClipDataset(tmp_path, num_frames=4, resolution=bad)


def test_odd_sized_sources_and_dataloader_workers(tmp_path):
    _good_video(tmp_path / "odd.webm", height=33, width=47, fps=12.5, codec="libvpx-vp9")
    _good_video(tmp_path / "odd.avi", height=33, width=47, fps=29.97, codec="mpeg4", seed=1)
    dataset = VideoClipDataset(tmp_path, num_frames=8, frame_stride=2, resolution=24, seed=3)
    loader = DataLoader(dataset, batch_size=2, num_workers=2)
    (batch,) = list(loader)
    assert batch["video"].shape == (2, 3, 8, 24, 24) and batch["video"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and batch["label"].tolist() == [0, 0]
    assert torch.equal(batch["video"][1], dataset[1]["video"])  # workers == main process


# --------------------------------------------------------------------------- demo data


def test_demo_videos_are_deterministic_and_idempotent(tmp_path):
    first = ensure_demo_videos(tmp_path / "a", **DEMO_ARGS)
    second = ensure_demo_videos(tmp_path / "b", **DEMO_ARGS)
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*.mp4"))
    assert len(files) == 6
    for name in files:
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes()
    assert first.read_text() == second.read_text()

    stamps = {p: p.stat().st_mtime_ns for p in first.parent.rglob("*") if p.is_file()}
    assert ensure_demo_videos(tmp_path / "a", **DEMO_ARGS) == first
    assert stamps == {p: p.stat().st_mtime_ns for p in first.parent.rglob("*") if p.is_file()}

    rows = first.read_text().splitlines()
    assert rows[0] == "path,label" and len(rows) == 7
    for row in rows[1:]:
        path, label = row.split(",")
        info = probe_video(first.parent / path)
        assert (info.num_frames, info.height, info.width, info.fps) == (5, 16, 16, 8.0)
        assert SHAPE_NAMES[int(label)] in path and 0 <= int(label) < 3


def test_demo_regenerates_when_parameters_change(tmp_path):
    manifest = ensure_demo_videos(tmp_path, **DEMO_ARGS)
    ensure_demo_videos(tmp_path, **(DEMO_ARGS | dict(num_videos=4, num_classes=0)))
    rows = manifest.read_text().splitlines()[1:]
    assert len(rows) == 4 and {row.split(",")[1] for row in rows} == {"0"}
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 4  # stale videos removed
    assert json.loads((tmp_path / "demo_params.json").read_text())["num_videos"] == 4
    with pytest.raises(ValueError, match="num_classes must be in"):
        ensure_demo_videos(tmp_path, **(DEMO_ARGS | dict(num_classes=len(SHAPE_NAMES) + 1)))


def test_demo_generation_is_shared_by_concurrent_processes(tmp_path):
    """Two processes that start generating at the same moment generate the data once."""
    root, go = tmp_path / "demo", tmp_path / "go"
    script = "\n".join([
        "import logging, os, sys, time",
        "from data.demo import ensure_demo_videos",
        "logging.basicConfig(level=logging.INFO)",
        "print('ready', file=sys.stderr, flush=True)",
        "while not os.path.exists(sys.argv[2]):",
        "    time.sleep(0.002)",
        "ensure_demo_videos(sys.argv[1], num_videos=48, num_classes=4, num_frames=8, resolution=32, fps=8)",
    ])
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(root), str(go)], cwd=REPO_ROOT,
                         env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    assert [proc.stderr.readline().strip() for proc in procs] == ["ready", "ready"]
    go.touch()  # both are polling for this file: they race from here
    logs = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    assert sum(log.count("Generating 48 demo videos") for log in logs) == 1, logs
    assert len((root / "manifest.csv").read_text().splitlines()) == 49
    assert not [p for p in root.rglob("*.tmp")]


def test_build_demo_dataset_from_shipped_config(tmp_path):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "demo.yaml")
    cfg.root = str(tmp_path / "demo")
    dataset = build_video_dataset(cfg, seed=0)
    assert len(dataset) == cfg.num_videos and not dataset.skipped
    batch = next(iter(DataLoader(dataset, batch_size=8)))
    assert batch["video"].shape == (8, 3, cfg.num_frames, cfg.resolution, cfg.resolution)
    assert batch["label"].tolist() == [i % cfg.num_classes for i in range(8)]
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1


def test_build_videos_dataset_from_shipped_config(tmp_path):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "videos.yaml")
    with pytest.raises(ValueError, match="data.root is not set"):
        build_video_dataset(cfg, seed=0)
    _good_video(tmp_path / "clip.mp4", num_frames=20, width=48)
    cfg.root = "~/" + os.path.relpath(tmp_path, os.path.expanduser("~"))  # `~` is expanded
    dataset = build_video_dataset(cfg, seed=0)
    assert dataset[0]["video"].shape == (3, cfg.num_frames, cfg.resolution, cfg.resolution)


@pytest.mark.parametrize("name", ["latents", "imagenet"])
def test_build_rejects_other_names(name):
    with pytest.raises(ValueError, match="valid: demo, videos.*latents"):
        build_video_dataset(OmegaConf.create({"name": name}), seed=0)


@pytest.mark.parametrize(
    "override,message",
    [
        ({"resoluton": 32}, r"unknown key\(s\) \['resoluton'\] in the data=demo config; valid keys: .*resolution"),
        ({"resolution": 0}, "resolution must be an integer >= 1, got 0"),
        ({"resize_mode": "stretch"}, "resize_mode must be one of crop, full"),
        ({"num_videos": "many"}, "num_videos must be an integer >= 1"),
        ({"num_classes": 9}, r"num_classes must be in \[0, 8\]"),
    ],
)
def test_build_checks_keys_and_values_before_any_work(tmp_path, override, message):
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "data" / "demo.yaml"), override)
    cfg.root = str(tmp_path / "demo")
    with pytest.raises(ValueError, match=message):
        build_video_dataset(cfg, seed=0)
    assert not (tmp_path / "demo" / "videos").exists()
