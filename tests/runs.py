"""Running linvid's commands as a user does, from the repository root (a helper module, not a test module)."""

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
