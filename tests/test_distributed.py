"""Scale-out with real processes: `accelerate launch` over gloo on the CPU, DDP and DeepSpeed ZeRO.

Every launch here is a user's command from docs/scaling.md with a tiny model. Each one
must exit 0 without the gloo abort at exit ("terminate called ..."). The comparisons use
the same global batch: 2 processes × batch 1 must train exactly like 1 process × batch 2,
because each sample's noise, flow time and label dropout derive from its global stream
position (dit.flow.training_randomness), not from the rank.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dit.checkpoint import CheckpointError, validate_checkpoint
from dit.train_state import load_checkpoint
from tests.paths import REPO_ROOT
from tests.runs import (
    ACCELERATE_CONFIGS,
    TIMEOUT_S,
    TINY,
    assert_clean_exit,
    free_port,
    launch,
)


def launch_train(run_dir, *overrides, env, script="train.py", **kwargs):
    return launch(script, *TINY, f"hydra.run.dir={run_dir}", *overrides, env=env, **kwargs)


def train_one_process(run_dir, *overrides, env):
    cmd = [sys.executable, "train.py", *TINY, f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert_clean_exit(result, " ".join(cmd[1:]))
    return result


def weights(run_dir: Path, step: int, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors")


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def trainer_state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.json").read_text())


def start_from(checkpoint: Path, run_dir: Path) -> None:
    """A new run directory holding only a copy of ``checkpoint`` (to resume it in another way)."""
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, run_dir / "checkpoints" / checkpoint.name)
    (run_dir / "checkpoints" / "latest").write_text(checkpoint.name + "\n")


# ------------------------------------------------------------------------------------------ DDP


def test_ddp_two_processes_match_one_and_resume_elastically(tmp_path, env):
    steps = ["train.max_steps=4", "train.checkpoint_every=2"]
    single = tmp_path / "one_process"
    train_one_process(single, *steps, "train.num_val_samples=0", env=env)  # global batch 2 = 1 × 2

    # 2 processes × batch 1; 3 validation videos split 2 + 1 over the ranks.
    ddp = tmp_path / "two_processes"
    result = launch_train(ddp, *steps, "train.batch_size=1", "train.num_val_samples=3", env=env)
    for step in (2, 4):
        assert f"step {step}: model and EMA weights identical on all 2 ranks" in result.stdout
        assert max_difference(weights(single, step), weights(ddp, step)) < 1e-5
        assert max_difference(weights(single, step, "ema"), weights(ddp, step, "ema")) < 1e-5
        assert trainer_state(ddp, step)["samples_seen"] == 2 * step
    assert trainer_state(ddp, 4)["world_size"] == 2
    assert len(list((ddp / "samples" / "step_00000004").glob("sample_*.mp4"))) == 3
    rng_states = torch.load(ddp / "checkpoints" / "step_00000004" / "rng_states.pt", weights_only=True)
    assert len(rng_states) == 2  # every rank's RNG state

    # Throughput counts the global batch: samples/s = steps/s × batch × processes.
    records = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples_seen"] for r in records] == [2, 4, 6, 8]
    for r in records:
        assert r["samples_per_s"] == pytest.approx(2 * r["steps_per_s"])

    # One run directory, written by rank 0 only: no Hydra or per-rank files, no temporary checkpoints.
    assert sorted(p.name for p in ddp.iterdir()) == ["checkpoints", "metrics.jsonl", "model_summary.json", "samples"]
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]

    # Elastic: the 2-process checkpoint of step 2 resumes with 1 process, batch 1 × 2 accumulation
    # steps (the same global batch, micro-step 1 taking rank 1's samples), and ends where the
    # uninterrupted runs end: no sample repeated or skipped.
    elastic = tmp_path / "two_then_one"
    start_from(ddp / "checkpoints" / "step_00000002", elastic)
    resumed = train_one_process(elastic, *steps, "train.batch_size=1", "train.grad_accum_steps=2",
                                "train.num_val_samples=0", env=env)
    assert "resumed from" in resumed.stdout and "(step 2, 4 samples seen)" in resumed.stdout
    assert max_difference(weights(single, 4), weights(elastic, 4)) < 1e-5
    assert max_difference(weights(single, 4, "ema"), weights(elastic, 4, "ema")) < 1e-5
    assert trainer_state(elastic, 4)["samples_seen"] == 8

    # Sampling split over two processes (3 videos: 2 + 1) from the DDP checkpoint.
    out = tmp_path / "videos"
    sampled = launch("sample.py", f"checkpoint={ddp}", "num_samples=3", "steps=2", f"out_dir={out}", env=env)
    assert "wrote 3 videos" in sampled.stdout and "2 processes" in sampled.stdout
    assert sorted(p.name for p in out.glob("*.mp4")) == [
        "grid.mp4", "sample_000_class0.mp4", "sample_001_class1.mp4", "sample_002_class2.mp4"]


CRASH_RANK_1 = """
import os, runpy, sys
sys.path.insert(0, {repo!r})
import dit.flow

calls = 0
real_loss = dit.flow.rectified_flow_loss

def loss_that_fails_on_rank_1(*args, **kwargs):
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == 3:
        raise RuntimeError("injected failure on rank 1")
    return real_loss(*args, **kwargs)

dit.flow.rectified_flow_loss = loss_that_fails_on_rank_1
runpy.run_path({train!r}, run_name="__main__")
"""


def test_a_failing_rank_stops_the_run_with_its_error(tmp_path, env):
    script = tmp_path / "crash_rank_1.py"
    script.write_text(CRASH_RANK_1.format(repo=str(REPO_ROOT), train=str(REPO_ROOT / "train.py")))
    run_dir = tmp_path / "crashing_run"
    result = launch_train(run_dir, "train.max_steps=50", "train.checkpoint_every=2", "train.num_val_samples=0",
                          script=script, env=env, check=False)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    # Rank 0 was stopped by the launcher, not left waiting on the failed rank's collective: the run
    # ends at the failure, well before its last step.
    latest = run_dir / "checkpoints" / "latest"
    assert not latest.exists() or int(latest.read_text().strip().split("_")[1]) < 50
    assert not (run_dir / "checkpoints" / "step_00000050").exists()
    assert not processes_left(run_dir), "processes left behind"


def processes_mentioning(text) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(text).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def processes_left(text) -> list[int]:
    """Processes mentioning ``text`` once they had every chance to exit (polls; only a bug waits long)."""
    deadline = time.time() + TIMEOUT_S
    while processes_mentioning(text) and time.time() < deadline:
        time.sleep(0.2)
    return processes_mentioning(text)


def test_killing_the_launcher_ends_every_rank(tmp_path, env):
    """torchrun starts ranks in their own sessions: `kill -9` of the launcher must not leave them training."""
    run_dir = tmp_path / "killed_run"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), "train.py", *TINY,
           f"hydra.run.dir={run_dir}", "train.max_steps=100000", "train.checkpoint_every=2", "train.num_val_samples=0"]
    launcher = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT_S
    while not (run_dir / "checkpoints" / "latest").exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    ranks = [pid for pid in processes_mentioning(run_dir) if pid != launcher.pid]
    assert launcher.poll() is None and len(ranks) == 2, "the run did not start two ranks"
    launcher.kill()
    launcher.wait()
    left = processes_left(run_dir)
    for pid in left:  # clean up before failing
        os.kill(pid, 9)
    assert not left, "ranks kept running after their launcher was killed"


# ------------------------------------------------------------------------------------------ DeepSpeed

deepspeed_installed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="deepspeed is not installed (pip install -e '.[deepspeed]'; first run JIT-builds a CPU op, ~2 min)",
)
# A higher LR makes the MHLA clamp act within a few steps (it must reach DeepSpeed's fp32
# masters); Adam amplifies float rounding more at this LR, hence the 1e-4 tolerance.
# A high learning rate on the unshifted flow-time schedule drives some MHLA mixing weights below zero
# within 6 steps, so that the clamp has work to do.
CLAMPING = ["train.lr=1e-2", "train.time_shift=1", "train.num_val_samples=0", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory, env):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_one_process(run_dir, *CLAMPING, "train.max_steps=6", env=env)
    clamped = sum(int((v == 0).sum()) for k, v in weights(run_dir, 6).items() if k.endswith("mixing"))
    assert clamped > 0, "the MHLA clamp did not act in the reference run; the test would prove nothing"
    return run_dir


@deepspeed_installed
def test_deepspeed_zero2_trains_checkpoints_resumes_and_samples(tmp_path, env, single_process_reference):
    run_dir = tmp_path / "zero2"
    for max_steps in (2, 4, 6):  # three launches in a row, each resuming the last
        result = launch_train(run_dir, *CLAMPING, f"train.max_steps={max_steps}", "train.batch_size=1",
                        config="zero2.yaml", env=env)
        if max_steps > 2:
            assert f"(step {max_steps - 2}, {2 * (max_steps - 2)} samples seen)" in result.stdout
        assert f"step {max_steps}: model and EMA weights identical on all 2 ranks" in result.stdout

    checkpoint = validate_checkpoint(run_dir / "checkpoints" / "step_00000006")
    files = json.loads((checkpoint / "checkpoint.json").read_text())["files"]
    for rank in (0, 1):
        assert f"deepspeed/zero/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
    assert "optimizer.pt" not in files
    state = trainer_state(run_dir, 6)
    assert (state["zero_stage"], state["world_size"], state["samples_seen"]) == (2, 2, 12)
    assert max_difference(weights(single_process_reference, 6), weights(run_dir, 6)) < 1e-4
    assert max_difference(weights(single_process_reference, 6, "ema"), weights(run_dir, 6, "ema")) < 1e-4
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))

    # sample.py reads the consolidated safetensors weights of a DeepSpeed checkpoint.
    out = tmp_path / "videos"
    sampled = subprocess.run([sys.executable, "sample.py", f"checkpoint={run_dir}", "num_samples=2", "steps=2",
                              f"out_dir={out}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    assert_clean_exit(sampled, "sample.py")
    assert (out / "grid.mp4").is_file()

    # Its optimizer shards cannot continue without DeepSpeed, or on another process count: refused.
    one_process = SimpleNamespace(num_processes=1, process_index=0)
    for zero_stage in (None, 2):
        with pytest.raises(CheckpointError, match=r"holds optimizer state of DeepSpeed ZeRO-2 on 2 processes"):
            load_checkpoint(checkpoint, None, None, None, None, one_process, zero_stage)


@deepspeed_installed
def test_deepspeed_zero3_partitions_ema_and_clamp_correctly(tmp_path, env, single_process_reference):
    run_dir = tmp_path / "zero3"
    for max_steps in (4, 6):
        launch_train(run_dir, *CLAMPING, f"train.max_steps={max_steps}", "train.batch_size=1",
               config="zero3.yaml", env=env)
    files = json.loads((validate_checkpoint(run_dir / "checkpoints" / "step_00000006") / "checkpoint.json").read_text())
    for rank in (0, 1):
        assert f"deepspeed/zero/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files["files"]
    # Consolidated weights and the EMA (updated from gathered parameters) match one process.
    assert max_difference(weights(single_process_reference, 6), weights(run_dir, 6)) < 1e-4
    assert max_difference(weights(single_process_reference, 6, "ema"), weights(run_dir, 6, "ema")) < 1e-4
