"""train.py and sample.py as a user runs them: real processes, real files, real configs."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from configs.entry import CONFIG_DIR, compose_config
from configs.schema import ConfigError, validate_config
from dit.checkpoint import CheckpointError, validate_checkpoint
from tests.paths import REPO_ROOT
from tests.runs import TIMEOUT_S, TINY, run, train


def frame_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def weights_bytes(checkpoint: Path) -> dict:
    return {name: (checkpoint / name).read_bytes() for name in ("model.safetensors", "ema.safetensors")}


def test_end_to_end_train_resume_sample(tmp_path, env):
    run_dir = tmp_path / "run"
    first = train(run_dir, "train.max_steps=4", "train.checkpoint_every=2", env=env)
    assert "tokens per sample" in first.stdout and "GFLOPs per sample" in first.stdout
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000004"
    for step in (2, 4):
        ckpt = validate_checkpoint(checkpoints / f"step_{step:08d}")
        for name in ("model.safetensors", "ema.safetensors", "config.yaml", "optimizer.pt", "trainer_state.json",
                     "rng_states.pt"):
            assert (ckpt / name).is_file(), name
    state = json.loads((checkpoints / "step_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["samples_seen"] == 8
    assert frame_count(run_dir / "samples" / "step_00000004" / "grid.mp4") == 4
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss == loss for loss in losses)

    # The same command with more steps continues the run by itself.
    second = train(run_dir, "train.max_steps=6", "train.checkpoint_every=2", env=env)
    assert "resumed from" in second.stdout and "step_00000004" in second.stdout
    assert (checkpoints / "latest").read_text().strip() == "step_00000006"

    out = tmp_path / "videos"
    sampled = run("sample.py", f"checkpoint={run_dir}", "num_samples=3", "steps=2", f"out_dir={out}", "seed=3", env=env)
    assert "wrote 3 videos" in sampled.stdout
    files = sorted(p.name for p in out.glob("*.mp4"))
    assert files == ["grid.mp4", "sample_000_class0.mp4", "sample_001_class1.mp4", "sample_002_class2.mp4"]
    assert all(frame_count(out / name) == 4 for name in files)
    again = tmp_path / "videos_again"
    run("sample.py", f"checkpoint={checkpoints / 'step_00000006'}", "num_samples=3", "steps=2", f"out_dir={again}",
        "seed=3", env=env)
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in files)  # same seed, same bytes


def test_sigkill_and_resume_is_bitwise_identical(tmp_path, env):
    overrides = ["train.max_steps=8", "train.checkpoint_every=2", "train.num_val_samples=0"]
    reference = tmp_path / "reference"
    train(reference, *overrides, env=env)

    interrupted = tmp_path / "interrupted"
    cmd = [sys.executable, "train.py", *TINY, f"hydra.run.dir={interrupted}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = interrupted / "checkpoints" / "latest"
    deadline = time.time() + TIMEOUT_S
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = pointer.read_text().strip()
    assert killed_at != "step_00000008", "the run finished before it could be killed"
    resumed = train(interrupted, *overrides, env=env)
    assert "resumed from" in resumed.stdout

    final = "checkpoints/step_00000008"
    assert weights_bytes(reference / final) == weights_bytes(interrupted / final)
    ref_opt = torch.load(reference / final / "optimizer.pt", weights_only=True)
    new_opt = torch.load(interrupted / final / "optimizer.pt", weights_only=True)
    for key, value in ref_opt["state"].items():
        assert torch.equal(value["exp_avg"], new_opt["state"][key]["exp_avg"])


def test_nonfinite_losses_stop_the_run_and_keep_the_last_checkpoint(tmp_path, env):
    run_dir = tmp_path / "run"
    result = train(run_dir, "train.max_steps=10", "train.checkpoint_every=1", "train.lr=1e30", "train.grad_clip=0",
                   "train.warmup_steps=0", "train.max_nonfinite_steps=2", "train.num_val_samples=0", env=env,
                   check=False)
    assert result.returncode != 0
    assert "consecutive non-finite losses" in result.stderr and "last good checkpoint" in result.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    checkpoint = validate_checkpoint(run_dir / "checkpoints" / latest)
    assert json.loads((checkpoint / "trainer_state.json").read_text())["consecutive_nonfinite"] == 0
    assert int(latest.split("_")[1]) < 10


def test_incomplete_checkpoint_is_refused(tmp_path, env):
    run_dir = tmp_path / "run"
    train(run_dir, "train.max_steps=2", "train.checkpoint_every=2", "train.num_val_samples=0", env=env)
    (run_dir / "checkpoints" / "step_00000002" / "ema.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        validate_checkpoint(run_dir / "checkpoints" / "step_00000002")
    result = run("sample.py", f"checkpoint={run_dir}", "num_samples=1", env=env, check=False)
    assert result.returncode != 0 and "incomplete or damaged" in result.stderr
    result = train(run_dir, "train.max_steps=4", env=env, check=False)
    assert result.returncode != 0 and "incomplete or damaged" in result.stderr


def test_resume_with_other_model_settings_is_refused(tmp_path, env):
    run_dir = tmp_path / "run"
    train(run_dir, "train.max_steps=1", "train.num_val_samples=0", env=env)
    result = train(run_dir, "train.max_steps=2", "attention=softmax", env=env, check=False)
    assert result.returncode != 0 and "different ['attention'] settings" in result.stderr
    resumed = train(run_dir, "train.max_steps=2", "data.cache_mb=0", env=env)  # how data is loaded may change
    assert "resumed from" in resumed.stdout


def test_cfg_job_prints_the_resolved_config(env):
    result = run("train.py", "--cfg", "job", "attention=hla", env=env)
    assert "name: hla" in result.stdout and "max_steps:" in result.stdout and "order: 2" in result.stdout


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.max_steps=-5", "train.max_steps=-5 is not valid; it must be a positive integer"),
        ("train.lr_schedule=linear", "train.lr_schedule='linear' is not valid; it must be one of ['constant', 'cosine']"),
        ("train.bogus=1", "Key 'bogus' is not in struct"),
        ("attention=flash", "Could not find 'attention/flash'"),
        ("attention.order=7", "attention.hla.order=7 is not valid; choose one of [1, 2, 3, 4]"),
        ("model.patch_size=[1,3,3]", "model.patch_size=[1, 3, 3] must divide the latent clip size"),
    ],
)
def test_bad_config_values_fail_before_any_work(tmp_path, env, override, message):
    overrides = [override] + (["attention=hla"] if override.startswith("attention.order") else [])
    run_env = {**env, "LINVID_CACHE": str(tmp_path / "cache")}
    result = run("train.py", f"hydra.run.dir={tmp_path / 'run'}", *overrides, env=run_env, check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert not (tmp_path / "cache").exists(), "demo data was generated before the config was checked"
    assert not (tmp_path / "run" / "checkpoints").exists()


def compose_train(*overrides):
    """The train config of ``overrides`` as Hydra composes it (unchecked: the tests check it)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.mixed_precision=fp8", "train.mixed_precision='fp8' is not valid; it must be one of ['no', 'bf16', 'fp16']"),
        ("train.batch_size=0", "train.batch_size=0 is not valid"),
        ("train.ema_decay=1.5", "train.ema_decay=1.5 is not valid; it must be a number in [0, 1)"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing='maybe' is not valid; it must be true or false"),
        ("logger.name=mlflow", "logger.name='mlflow' is not valid; it must be one of ['none', 'tensorboard', 'wandb']"),
        ("seed=-1", "seed=-1 is not valid"),
        ("train.fvd_num_samples=1", "train.fvd_num_samples=1 is not valid; it must be an integer ≥ 2"),
        ("train.fvd_every=-3", "train.fvd_every=-3 is not valid; it must be an integer ≥ 0"),
        ("+train.extra=3", "unknown key(s) ['train.extra']"),
    ],
)
def test_schema_names_the_bad_value_and_the_valid_choices(override, message):
    with pytest.raises(ConfigError) as excinfo:
        validate_config(compose_train(override), "train")
    assert message in str(excinfo.value)


def test_every_shipped_combination_validates():
    for model in ("tiny", "S", "B", "L", "XL"):
        for logger in ("none", "tensorboard", "wandb"):
            compose_config("train", [f"model={model}", f"logger={logger}"])


def test_the_attention_study_composes_for_every_variant_at_1024_tokens():
    for attention in ("softmax", "linear", "hla", "mhla", "hybrid"):
        cfg = compose_config("train", ["+experiment=attention_study", f"attention={attention}"])
        patch = cfg.model.patch_size
        tokens = (cfg.data.num_frames // patch[0]) * (cfg.data.resolution // patch[1]) * (cfg.data.resolution // patch[2])
        assert tokens >= 1024 and cfg.attention.name == attention and cfg.data.name == "demo"
        assert cfg.train.max_steps == 2400 and cfg.train.score_every > 0 and cfg.train.max_steps % cfg.train.score_every == 0


def test_sweep_over_attention_variants_runs_each_in_its_own_directory(tmp_path, env):
    sweep_dir = tmp_path / "sweep"
    run("train.py", "-m", "attention=linear,mhla", *TINY, "train.max_steps=1",
        "train.num_val_samples=0", f"hydra.sweep.dir={sweep_dir}", env=env)
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    variants = [run_dir.name.split("+")[0] for run_dir in runs]  # a run is named by its overrides
    assert variants == ["attention-linear", "attention-mhla"]
    for run_dir, variant in zip(runs, variants):
        assert not set("=,[]'\" ") & set(run_dir.name), "a sweep run directory must be a plain Hydra value"
        checkpoint = run_dir / "checkpoints" / "step_00000001"
        validate_checkpoint(checkpoint)
        assert f"name: {variant.split('-')[1]}" in (checkpoint / "config.yaml").read_text()
        assert load_file(checkpoint / "ema.safetensors")
    # Any directory a sweep writes is passed back to another command as it is.
    sampled = run("sample.py", f"checkpoint={runs[0]}", "num_samples=1", "steps=1", f"out_dir={tmp_path / 'v'}",
                  env=env)
    assert "wrote 1 videos" in sampled.stdout


def test_compiled_training_matches_eager_and_resumes(tmp_path, env):
    """train.compile compiles the blocks (aot_eager here: the same graphs as inductor, without code generation)."""
    steps = ["train.max_steps=4", "train.checkpoint_every=2", "train.num_val_samples=1"]
    eager = tmp_path / "eager"
    train(eager, *steps, env=env)
    compiled = tmp_path / "compiled"
    flags = ["train.compile=true", "train.compile_backend=aot_eager"]
    train(compiled, *flags, "train.max_steps=2", "train.checkpoint_every=2", "train.num_val_samples=1", env=env)
    resumed = train(compiled, *flags, *steps, env=env)
    assert "resumed from" in resumed.stdout
    losses = {name: [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
              for name, run_dir in (("eager", eager), ("compiled", compiled))}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    final = "checkpoints/step_00000004/model.safetensors"
    a, b = load_file(eager / final), load_file(compiled / final)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (compiled / "samples" / "step_00000004" / "grid.mp4").is_file()
