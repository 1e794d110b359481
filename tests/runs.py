"""Running linvid's commands as a user does, from the repository root (a helper module, not a test module)."""

import socket
import subprocess
import sys

from tests.paths import REPO_ROOT

# A tiny but complete run: 16 demo clips of 4 frames at 16², a 2-block DiT (64 tokens).
TINY = [
    "data.num_videos=16", "data.num_frames=4", "data.resolution=16",
    "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
    "train.batch_size=2", "train.log_every=1", "train.num_val_samples=2", "train.val_steps=2",
    "train.warmup_steps=2",
]
# Generous: only a hung process may take this long; a slow machine never does.
TIMEOUT_S = 900
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"


def run_command(args, *, env, check=True) -> subprocess.CompletedProcess:
    """Run ``args`` from the repository root; fail with its output when ``check`` and it fails."""
    result = subprocess.run([str(a) for a in args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run(script, *overrides, env, check=True) -> subprocess.CompletedProcess:
    """``python <script> <overrides>`` (a script of the repository, e.g. train.py)."""
    return run_command([sys.executable, script, *overrides], env=env, check=check)


def train(run_dir, *overrides, env, check=True) -> subprocess.CompletedProcess:
    """``python train.py`` of the TINY run into ``run_dir``."""
    return run("train.py", *TINY, f"hydra.run.dir={run_dir}", *overrides, env=env, check=check)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_clean_exit(result: subprocess.CompletedProcess, what: str) -> None:
    output = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output}"
    assert "terminate called" not in result.stderr, f"{what} aborted at exit:\n{output}"
    assert "Traceback" not in result.stderr, f"{what} printed a traceback:\n{output}"


def launch(script, *arguments, env, config="cpu_2proc.yaml", check=True):
    """`accelerate launch --config_file configs/accelerate/<config> --num_processes 2 <script> <arguments>`."""
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch",
           "--config_file", str(ACCELERATE_CONFIGS / config), "--num_processes", "2",
           "--main_process_port", str(free_port()), str(script), *arguments]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if check:
        assert_clean_exit(result, " ".join(cmd[4:]))
    return result
