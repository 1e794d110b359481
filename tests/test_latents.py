"""Latent pre-extraction (data/extract_latents.py) and training from latents (data/latents.py).

As a user runs it: a folder of real mp4 files (two class sub-folders, one corrupt and one
too-short file) -> ``python -m data.extract_latents`` with a tiny Wan VAE saved to disk ->
``python train.py data=latents`` -> ``python sample.py``; plus resume, 2-process extraction
and every refusal of a latent directory that does not fit the run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import av
import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from configs.entry import CONFIG_DIR, compose_config
from data.datasets import build_video_dataset
from data.extract_latents import (
    ExtractionError,
    extract,
    plan_hash,
    planned_clip,
    scan_shards,
)
from data.latents import (
    LatentDataset,
    LatentDirectoryError,
    read_manifest,
    vae_identity_key,
)
from data.sampler import sample_seed
from data.training_data import TrainingData
from data.vae import build_vae
from tests.runs import run_command as run
from tests.vae_fixtures import save_tiny_vae
from tests.video_fixtures import encode_video, make_frames, write_random_bytes

# 6 usable videos (3 per class) -> 3 shards of 2 clips; clips of 5 frames at 16x16.
CLIP = ["data=videos", "data.num_classes=2", "data.num_frames=5", "data.resolution=16"]
SHARDING = ["shard_size=2", "batch_size=2", "cpu_threads=1"]  # 1 thread: bytes comparable across runs
TINY_DIT = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=[1,1,1]"]


def extract_cmd(*overrides):
    return [sys.executable, "-m", "data.extract_latents", *overrides]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """cats/ and dogs/ with 3 good mp4 files each (20x24, 12-14 frames), a corrupt and a too-short file."""
    root = tmp_path_factory.mktemp("videos")
    for label, name in enumerate(("cats", "dogs")):
        for i in range(3):
            encode_video(root / name / f"clip{i}.mp4", make_frames(12 + i, 20, 24, seed=10 * label + i), fps=8)
    write_random_bytes(root / "cats" / "corrupt.mp4")
    encode_video(root / "dogs" / "short.mp4", make_frames(3, 20, 24, seed=99), fps=8)
    return root


@pytest.fixture(scope="module")
def wan_path(tmp_path_factory):
    return save_tiny_vae("wan", tmp_path_factory.mktemp("vae") / "wan")


@pytest.fixture(scope="module")
def wan_args(videos, wan_path):
    return [*CLIP, f"data.root={videos}", "vae=wan", f"vae.path={wan_path}", *SHARDING]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, wan_args, env):
    """An uninterrupted 1-process extraction with the tiny Wan VAE: (out dir, its stdout)."""
    out = tmp_path_factory.mktemp("latents") / "wan"
    result = run(extract_cmd(*wan_args, f"out={out}"), env=env)
    return out, result.stdout


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def files_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a folder (hidden ones included), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def videos_cfg(root):
    """configs/data/videos.yaml with the clip settings of CLIP."""
    return OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "data" / "videos.yaml"),
                           {"root": str(root), "num_classes": 2, "num_frames": 5, "resolution": 16})


def latents_cfg(root, num_classes=2):
    return OmegaConf.create({"name": "latents", "root": str(root), "num_classes": num_classes, "fps": 8,
                             "num_workers": 0})


def wan_cfg(path):
    return OmegaConf.create({"name": "wan", "path": str(path), "scaling_factor": None})


# --------------------------------------------------------------------------- end to end


def test_extract_train_sample_end_to_end(tmp_path, reference, videos, wan_path, env):
    out, stdout = reference
    # The report names the skipped files; skipped_files.txt lists them too.
    assert "skipped 2 file(s)" in stdout and "corrupt.mp4" in stdout and "short.mp4" in stdout
    assert "clips/s" in stdout and "encoded 6 clips" in stdout
    skipped = (out / "skipped_files.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in skipped) == ["corrupt.mp4", "short.mp4"]
    assert "too short" in (out / "skipped_files.txt").read_text()

    manifest = read_manifest(out)
    vae = build_vae(wan_cfg(wan_path))
    assert manifest["vae"] == vae.identity_key()
    assert manifest["latent_shape"] == [4, 2, 2, 2] and manifest["num_clips"] == 6
    assert [s["num_clips"] for s in manifest["shards"]] == [2, 2, 2] and manifest["num_shards"] == 3
    assert manifest["classes"] == ["cats", "dogs"] and manifest["labels_present"] == [0, 1]
    assert manifest["num_classes"] == 2 and manifest["fps"] == 8
    assert [Path(c["path"]).parent.name for c in manifest["clips"]] == ["cats"] * 3 + ["dogs"] * 3
    assert [(c["shard"], c["row"]) for c in manifest["clips"]] == [(k, r) for k in range(3) for r in range(2)]

    # Each shard holds what the VAE gives for the dataset's clips (same batches of 2, 1 thread).
    dataset = build_video_dataset(videos_cfg(videos), seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for shard in range(3):
            keys = [(i, sample_seed(0, i)) for i in (2 * shard, 2 * shard + 1)]
            clips = torch.stack([dataset[key]["video"] for key in keys])
            tensors = load_file(out / f"shard_{shard:05d}.safetensors")
            assert tensors["latents"].dtype == torch.float32 and tensors["latents"].shape == (2, 4, 2, 2, 2)
            assert torch.equal(tensors["latents"], vae.encode(clips))
            assert tensors["labels"].tolist() == [dataset.entries[i].label for i, _ in keys]
            for (i, _), clip in zip(keys, manifest["clips"][2 * shard : 2 * shard + 2]):
                assert clip["frames"] == dataset.frame_indices(i, sample_seed(0, i))
    finally:
        torch.set_num_threads(threads)

    # The dataset train.py builds, read through DataLoader workers.
    latents = LatentDataset.from_config(latents_cfg(out), vae_cfg=wan_cfg(wan_path))
    assert len(latents) == 6 and latents.latent_shape == (4, 2, 2, 2) and latents.skipped == []
    item = latents[(3, 12345)]
    assert item["latents"].dtype == torch.float32 and item["latents"].shape == (4, 2, 2, 2)
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 1 and item["index"] == 3
    assert torch.equal(item["latents"], load_file(out / "shard_00001.safetensors")["latents"][1])
    batches = list(torch.utils.data.DataLoader(latents, batch_size=3, num_workers=2))
    assert torch.equal(torch.cat([b["label"] for b in batches]), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert TrainingData(latents_cfg(out), wan_cfg(wan_path), seed=0).latent_shape(vae) == (4, 2, 2, 2)

    # Train from the latents, then sample: videos decoded by the Wan VAE have 5 frames.
    run_dir = tmp_path / "run"
    trained = run([sys.executable, "train.py", "data=latents", f"data.root={out}", "data.num_classes=2", "vae=wan",
                   f"vae.path={wan_path}", *TINY_DIT, "train.max_steps=2", "train.batch_size=2",
                   "train.num_val_samples=1", "train.val_steps=2", f"hydra.run.dir={run_dir}"], env=env)
    assert "done: 2 steps" in trained.stdout
    assert frame_count(run_dir / "samples" / "step_00000002" / "sample_000.mp4") == 5
    videos_out = tmp_path / "videos"
    sampled = run([sys.executable, "sample.py", f"checkpoint={run_dir}", "num_samples=2", "steps=2",
                   f"out_dir={videos_out}"], env=env)
    assert "wrote 2 videos" in sampled.stdout
    files = sorted(p.name for p in videos_out.glob("*.mp4"))
    assert files == ["grid.mp4", "sample_000_class0.mp4", "sample_001_class1.mp4"]
    assert all(frame_count(videos_out / name) == 5 for name in files)


# --------------------------------------------------------------------------- resume, processes


def test_interrupted_extraction_resumes_to_identical_files(tmp_path, reference, wan_args, wan_path, env):
    ref, _ = reference
    out = tmp_path / "latents"
    out.mkdir()
    # What an interrupted run leaves: one finished shard and a half-written temporary, no manifest.
    shutil.copy2(ref / "shard_00000.safetensors", out / "shard_00000.safetensors")
    (out / ".shard_00001.safetensors.4242.deadbeef.tmp").write_bytes(b"half a shard")
    os.utime(out / "shard_00000.safetensors", ns=(1_000_000_000, 1_000_000_000))
    with pytest.raises(LatentDirectoryError, match="no manifest.json: the extraction is unfinished"):
        LatentDataset.from_config(latents_cfg(out), vae_cfg=wan_cfg(wan_path))

    result = run(extract_cmd(*wan_args, f"out={out}"), env=env)
    assert "1 already complete, 2 to encode (4 clips)" in result.stdout
    assert "removed stale temporary file" in result.stdout and "encoded 4 clips" in result.stdout
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == 1_000_000_000  # not rewritten
    assert files_bytes(out) == files_bytes(ref)  # no temporaries left, every byte as uninterrupted


def test_two_process_extraction_matches_one_process(tmp_path, reference, wan_args, env):
    ref, _ = reference
    out = tmp_path / "latents"
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "data.extract_latents"]
    result = run([*launch, *wan_args, f"out={out}"], env={**env, "ACCELERATE_USE_CPU": "1"})
    assert "on 2 process(es)" in result.stdout and "terminate called" not in result.stderr
    assert "encode (rank 0 of 2)" in result.stderr and "4/4" in result.stderr  # rank 0: shards 0 and 2
    assert files_bytes(out) == files_bytes(ref)


def test_identity_vae_extracts_pixel_clips(tmp_path, videos, env):
    out = tmp_path / "pixels"
    result = run(extract_cmd(*CLIP, f"data.root={videos}", "vae=identity", "shard_size=4", f"out={out}"), env=env)
    assert "encoded 6 clips" in result.stdout
    manifest = read_manifest(out)
    assert manifest["vae"] == {"name": "identity", "config_hash": "identity"}
    assert manifest["latent_shape"] == [3, 5, 16, 16] and [s["num_clips"] for s in manifest["shards"]] == [4, 2]
    dataset = build_video_dataset(videos_cfg(videos), seed=0)
    latents = LatentDataset.from_config(latents_cfg(out), vae_cfg=OmegaConf.create({"name": "identity"}))
    for i in range(6):
        assert torch.equal(latents[i]["latents"], dataset[(i, sample_seed(0, i))]["video"])


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def copy_of(reference, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    return out


def edit_manifest(root: Path, **changes) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.update(changes)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_missing_manifest_is_refused(tmp_path, wan_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LatentDirectoryError, match="not a \\(finished\\) latent directory.*extract_latents"):
        LatentDataset.from_config(latents_cfg(empty), vae_cfg=wan_cfg(wan_path))
    def latent_shape(data_cfg):
        return TrainingData(data_cfg, wan_cfg(wan_path), seed=0).latent_shape(None)

    with pytest.raises(LatentDirectoryError, match="does not exist"):
        latent_shape(latents_cfg(tmp_path / "nowhere"))
    with pytest.raises(LatentDirectoryError, match="data.root is not set"):
        latent_shape(OmegaConf.create({"name": "latents", "root": "???", "num_classes": 0}))
    with pytest.raises(LatentDirectoryError, match="unknown key\\(s\\) \\['num_frames'\\]"):
        latent_shape(OmegaConf.create({"name": "latents", "root": "x", "num_classes": 0, "num_frames": 5}))


def test_manifest_and_shards_that_disagree_are_refused(copy_of, wan_path):
    vae = wan_cfg(wan_path)
    LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=vae)  # intact: accepted

    shard = copy_of / "shard_00001.safetensors"
    original = shard.read_bytes()
    shard.unlink()
    with pytest.raises(LatentDirectoryError, match="lists shard_00001.safetensors but the file is missing"):
        LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=vae)

    # One row fewer than the manifest says (with the size it records, so the row check speaks).
    tensors = {"latents": torch.zeros(1, 4, 2, 2, 2), "labels": torch.zeros(1, dtype=torch.int64)}
    save_file(tensors, str(shard))
    manifest = json.loads((copy_of / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = shard.stat().st_size
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentDirectoryError, match="shard_00001.safetensors holds 1 rows .* says 2 clips"):
        LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=vae)

    manifest["shards"][1]["bytes"] = len(original) + 1
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    shard.write_bytes(original)
    with pytest.raises(LatentDirectoryError, match=f"has {len(original)} bytes, manifest.json says"):
        LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=vae)

    manifest["shards"][1]["bytes"] = len(original)
    manifest["latent_shape"] = [4, 3, 2, 2]
    (copy_of / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentDirectoryError, match=r"latents shaped \[4, 2, 2, 2\] per clip, but manifest.json says \[4, 3, 2, 2\]"):
        LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=vae)

    edit_manifest(copy_of, latent_shape=[4, 2, 2, 2])
    shutil.copy2(shard, copy_of / "shard_00007.safetensors")
    with pytest.raises(LatentDirectoryError, match=r"shard file\(s\) \['shard_00007.safetensors'\] are not in manifest.json"):
        LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=vae)


def test_latents_of_another_vae_are_refused(copy_of, wan_path, tmp_path):
    # Another Wan VAE: other latent normalisation, so another config hash.
    other = save_tiny_vae("wan", tmp_path / "other_wan", latents_std=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(LatentDirectoryError, match="made by the wan VAE at .* but this run's vae config names the wan VAE"):
        LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=wan_cfg(other))
    with pytest.raises(LatentDirectoryError, match="made by the wan VAE .* names the identity VAE"):
        LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=OmegaConf.create({"name": "identity"}))
    # The same VAE moved to another folder is still the same VAE; its key needs no weights.
    moved = shutil.copytree(wan_path, tmp_path / "moved_wan")
    (moved / "diffusion_pytorch_model.safetensors").unlink()
    assert vae_identity_key(wan_cfg(moved))["config_hash"] == build_vae(wan_cfg(wan_path)).identity_key()["config_hash"]
    assert len(LatentDataset.from_config(latents_cfg(copy_of), vae_cfg=wan_cfg(moved))) == 6


def test_num_classes_must_cover_the_labels(copy_of, wan_path):
    with pytest.raises(LatentDirectoryError, match="data.num_classes=1 is smaller than the labels present"):
        LatentDataset.from_config(latents_cfg(copy_of, num_classes=1), vae_cfg=wan_cfg(wan_path))
    assert LatentDataset.from_config(latents_cfg(copy_of, num_classes=0), vae_cfg=wan_cfg(wan_path)).num_classes == 0


def test_extraction_refuses_an_out_dir_of_other_settings(reference, videos, wan_path):
    out = reference[0]
    dataset = build_video_dataset(videos_cfg(videos), seed=0)
    metadata = json.loads(safe_open(str(out / "shard_00000.safetensors"), "pt").metadata()["linvid_shard"])
    settings = metadata["settings"]
    plans = []
    for shard in range(3):
        clips = [planned_clip(dataset, i, 0) for i in (2 * shard, 2 * shard + 1)]
        plans.append({"clips": clips, "hash": plan_hash(clips)})
    assert scan_shards(out, settings, plans, 3) == [0, 1, 2]
    with pytest.raises(ExtractionError, match=r"made with other settings \(differing: \['seed'\]\)"):
        scan_shards(out, {**settings, "seed": 1}, plans, 3)
    with pytest.raises(ExtractionError, match="other clips than this dataset gives"):
        scan_shards(out, settings, plans[::-1], 3)
    with pytest.raises(ExtractionError, match="beyond the 2 shard"):
        scan_shards(out, settings, plans[:2], 2)


def test_a_clip_shape_the_vae_cannot_encode_fails_before_any_work(tmp_path, videos, wan_path):
    cfg = compose_config("extract_latents", [*CLIP, "data.num_frames=6", f"data.root={videos}", "vae=wan",
                                             f"vae.path={wan_path}", f"out={tmp_path / 'out'}"])
    with pytest.raises(ValueError, match=r"needs num_frames = 4k\+1, e.g. 5 or 9"):
        extract(cfg)
    assert not (tmp_path / "out").exists()
