"""``python -m eval.fvd checkpoint=...`` on a real tiny run: real processes, real files, an I3D at 224².

The I3D is the real one when ``python -m eval.fvd fetch-weights`` has cached it; otherwise a
random-weight I3D in the same safetensors layout, whose number the CLI refuses to report as
FVD unless ``allow_unverified_weights=true`` is given (and then writes ``fvd: null`` under
``fvd/unverified/``).  Every process runs with one thread, so 1- and 2-process runs do the
same arithmetic per clip.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import eval.fvd as fvd
from configs.entry import compose_config
from data import extract_latents
from dit.checkpoint import CheckpointError
from eval.fvd import command, sources
from eval.fvd import weights as fvd_weights
from eval.fvd.i3d import I3D
from eval.generation import load_sampling_setup
from eval.report import fvd_result
from tests.fvd_fixtures import StubFeatures
from tests.runs import run_command

# The user's cached weights, looked up before any test changes LINVID_CACHE.
CACHED_WEIGHTS = fvd_weights.default_weights_dir() / fvd_weights.WEIGHTS_FILENAME

# 8 demo videos of 9 frames (I3D's minimum) at 16², a 2-block DiT with (1, 4, 4) patches.
TINY_9F = [
    "data.num_videos=8", "data.num_frames=9", "data.resolution=16", "model.patch_size=[1,4,4]",
    "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=2", "train.max_steps=1",
    "train.num_val_samples=0", "train.warmup_steps=1",
]
FVD_ARGS = ["num_samples=4", "max_clips=4", "batch_size=2", "steps=2"]


def fvd_command(args: list[str]) -> dict | None:
    """``python -m eval.fvd <args>`` in-process: the checked config, then the command."""
    return command.run(compose_config("fvd", args, positional_key="command"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, env):
    path = tmp_path_factory.mktemp("fvd_run") / "run"
    run_command([sys.executable, "train.py", *TINY_9F, f"hydra.run.dir={path}"], env=env)
    return path


def random_i3d_file(path: Path) -> Path:
    """A random-weight I3D in the safetensors layout fetch-weights writes (without its provenance header)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(I3D().state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(weights file, whether it holds the pretrained Kinetics-400 weights)."""
    if CACHED_WEIGHTS.is_file():
        return CACHED_WEIGHTS, True
    return random_i3d_file(tmp_path_factory.mktemp("i3d") / "random_i3d.safetensors"), False


@pytest.mark.slow
def test_checkpoint_fvd_cached_real_stats_and_two_processes(run_dir, weights, env, tmp_path):
    path, pretrained = weights
    flags = [f"weights={path}"] + ([] if pretrained else ["allow_unverified_weights=true"])
    one = run_command([sys.executable, "-m", "eval.fvd", f"checkpoint={run_dir}", *FVD_ARGS, *flags], env=env)
    where = run_dir / "fvd" / ("" if pretrained else "unverified") / "fvd_fvd4_9f_step00000001.json"
    assert f"result written to {where}" in one.stdout
    first = json.loads(where.read_text())

    assert first["frechet_distance"] > 0 and first["is_fvd"] == pretrained
    assert first["fvd"] == (first["frechet_distance"] if pretrained else None)
    assert (first["num_clips"], first["num_clips_real"], first["num_clips_fake"]) == (4, 4, 4)
    assert (first["num_frames"], first["frame_stride"], first["resolution"]) == (9, 1, 224)
    assert first["protocol"] == "fvd4_9f" and not first["comparable_to_published"]
    assert first["video_resolution"] == [16, 16]
    assert first["real"]["description"].startswith("training split: data=demo")
    assert not first["real"]["stats_cached"] and Path(first["real"]["stats_cache"]).is_file()
    assert first["weights"] == {"path": str(path), "sha256": fvd_weights.sha256_file(path), "pretrained": pretrained,
                                "source": first["weights"]["source"]}
    assert first["checkpoint"] == {"path": str(run_dir / "checkpoints" / "step_00000001"), "step": 1,
                                   "weights": "ema"}
    run_shift = OmegaConf.load(run_dir / "checkpoints" / "step_00000001" / "config.yaml").train.time_shift
    assert first["sampling"] == {
        "num_samples": 4, "steps": 2, "cfg_scale": 4.0, "seed": 0, "batch_size": 2, "time_shift": run_shift,
        "labels": "cycling over 4 classes", "noise_seeds": "seed * 100003 + sample index"}
    assert first["num_processes"] == 1 and first["elapsed_s"] > 0
    # eval.report shows FVDs only; a distance computed with random weights is never one.
    assert fvd_result(run_dir) == (f"{first['fvd']:.1f} (4 clips)" if pretrained else "—")

    # Same command on 2 processes: real statistics come from the cache, samples are split by batch.
    out = tmp_path / "two.json"
    launch = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    run_command([*launch, "-m", "eval.fvd", f"checkpoint={run_dir}", *FVD_ARGS, *flags, f"out={out}"],
                env={**env, "ACCELERATE_USE_CPU": "1"})
    second = json.loads(out.read_text())
    assert second["num_processes"] == 2 and second["num_clips_fake"] == 4
    assert second["real"]["stats_cached"] and second["real"]["stats_cache"] == first["real"]["stats_cache"]
    assert second["real"]["elapsed_s"] < first["real"]["elapsed_s"] / 3  # no I3D pass over real clips
    # Same seed, same videos; only float32 round-off in I3D differs between processes (~1e-7).
    assert second["frechet_distance"] == pytest.approx(first["frechet_distance"], rel=1e-6)


def test_checkpoint_mode_fails_before_generating(run_dir, env, tmp_path, monkeypatch):
    import dit.sampling

    def no_generation(*args, **kwargs):
        raise AssertionError("videos were generated before the weights were checked")

    monkeypatch.setattr(dit.sampling, "generate_videos", no_generation)
    monkeypatch.setenv("LINVID_CACHE", str(tmp_path / "cache"))
    with pytest.raises(fvd.FVDError) as err:
        fvd_command([f"checkpoint={run_dir}", *FVD_ARGS, f"weights={tmp_path / 'missing.safetensors'}"])
    message = str(err.value)
    assert "python -m eval.fvd fetch-weights" in message and "i3d_torchscript.pt" in message

    random_weights = random_i3d_file(tmp_path / "random.safetensors")
    with pytest.raises(fvd.FVDError, match="not the pretrained Kinetics-400 ones") as err:
        fvd_command([f"checkpoint={run_dir}", *FVD_ARGS, f"weights={random_weights}"])
    assert "allow_unverified_weights=true" in str(err.value)
    with pytest.raises(CheckpointError, match="neither a run directory"):
        fvd_command([f"checkpoint={tmp_path}", f"weights={random_weights}"])
    assert not (tmp_path / "cache").exists()  # no real statistics either


@pytest.mark.parametrize("frames,message", [(4, "this run's clips have 4 frames"), (8, "at least 9 frames")])
def test_clips_shorter_than_nine_frames_are_refused(frames, message):
    run_cfg = OmegaConf.create({"data": {"name": "demo", "num_frames": frames, "frame_stride": 1},
                                "vae": {"name": "identity"}, "seed": 0})
    with pytest.raises(fvd.FVDError, match=message):
        fvd.checkpoint_protocol(run_cfg)
    ok = OmegaConf.create({"data": {"name": "videos", "num_frames": 24, "frame_stride": 2},
                           "vae": {"name": "identity"}, "seed": 0})
    assert fvd.checkpoint_protocol(ok) == fvd.Protocol(num_frames=16, stride=2)
    assert fvd.checkpoint_protocol(ok, num_frames=24, max_clips=64).label() == "fvd64_24f_stride2"
    with pytest.raises(fvd.FVDError, match=r"num_frames=25 is not valid.*\[9, 24\]"):
        fvd.checkpoint_protocol(ok, num_frames=25)


def test_result_paths(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000300"
    assert command.default_result_path(checkpoint, "fvd2048_16f", True) == \
        tmp_path / "run" / "fvd" / "fvd_fvd2048_16f_step00000300.json"
    assert command.default_result_path(checkpoint, "fvd64_16f", False) == \
        tmp_path / "run" / "fvd" / "unverified" / "fvd_fvd64_16f_step00000300.json"


def test_periodic_training_fvd_api(run_dir, cache_env, tmp_path):
    """What train.py calls every train.fvd_every steps (stand-in features: cheap, and not an FVD)."""
    checkpoint = run_dir / "checkpoints" / "step_00000001"
    model, vae, run_cfg = load_sampling_setup(checkpoint, "cpu")
    stub = StubFeatures()
    real, info = fvd.training_real_stats(run_cfg, vae, stub, max_clips=6, batch_size=4, cache_dir=tmp_path)
    assert real.n == 6 and real.metadata["num_frames"] == 9 and not info["stats_cached"]
    again, info = fvd.training_real_stats(run_cfg, vae, stub, max_clips=6, batch_size=4, cache_dir=tmp_path)
    assert info["stats_cached"] and np.array_equal(again.sum_outer, real.sum_outer)

    kwargs = dict(num_samples=3, steps=2, cfg_scale=4.0, i3d=stub, real_stats=real, batch_size=2)
    with pytest.raises(fvd.FVDError, match="not the pretrained"):
        fvd.fvd_of_model(model, vae.decode, run_cfg, seed=0, **kwargs)
    value = fvd.fvd_of_model(model, vae.decode, run_cfg, seed=0, allow_unverified_weights=True, **kwargs)
    assert value > 0
    assert fvd.fvd_of_model(model, vae.decode, run_cfg, seed=0, allow_unverified_weights=True, **kwargs) == value
    assert fvd.fvd_of_model(model, vae.decode, run_cfg, seed=1, allow_unverified_weights=True, **kwargs) != value


def test_real_clips_from_a_latent_directory_match_the_training_clips(run_dir, cache_env, tmp_path):
    """real=<latent dir>: latents decoded with the VAE their manifest records (identity VAE: the clips themselves)."""
    run_cfg = OmegaConf.load(run_dir / "checkpoints" / "step_00000001" / "config.yaml")
    data = {k: v for k, v in OmegaConf.to_container(run_cfg.data).items() if k not in ("num_workers",)}
    overrides = [f"data={data['name']}", *(f"data.{k}={json.dumps(v)}" for k, v in data.items() if k != "name"),
                 f"out={tmp_path / 'latents'}", "batch_size=4", "shard_size=4"]
    extract_latents.extract(compose_config("extract_latents", overrides))

    model, vae, run_cfg = load_sampling_setup(run_dir / "checkpoints" / "step_00000001", "cpu")
    latent_source = sources.latent_dir_clip_source(tmp_path / "latents", vae, 9, "cpu")
    training_source = sources.training_clip_source(run_cfg, vae, 9)
    assert latent_source.num_items == training_source.num_items == 8
    assert latent_source.description.startswith("latent directory")
    latent_clips, _ = latent_source.load([0, 1, 2])
    training_clips, _ = training_source.load([0, 1, 2])
    assert latent_clips.shape == (3, 9, 16, 16, 3) and latent_clips.dtype == np.uint8
    np.testing.assert_array_equal(latent_clips, training_clips)
