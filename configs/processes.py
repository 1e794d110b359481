"""Process set-up: the one place that joins the process group of a linvid entry point.

Every entry point runs alone or under ``accelerate launch`` / torchrun (DDP or DeepSpeed,
GPUs or CPUs). Two facts of accelerate 1.15 shape this module (docs/scaling.md):

* without CUDA, several processes must be told to use the CPU and gloo, or accelerate
  leaves them undistributed (every process rank 0 of 1);
* DeepSpeed picks its CPU accelerator itself and must not be told ``cpu=True``.

:func:`process_state` serves sampling, evaluation and extraction; :func:`training_accelerator`
serves ``train.py``; both derive their settings from :func:`_process_group_settings`.
:func:`end_processes` tears down cleanly (no gloo abort at exit).
"""

from __future__ import annotations

import gc
import os
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import InitProcessGroupKwargs

# A collective that waits longer than this (a rank hung, not crashed) fails instead of hanging forever.
# A crashed rank is handled sooner: the launcher (torchrun) stops the others when one exits non-zero.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
_TRUE = ("1", "true", "yes")


def launched_processes() -> int:
    """How many processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_launch() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _process_group_settings() -> tuple[bool, dict]:
    """(cpu flag for accelerate, process-group keyword arguments) for this launch."""
    no_cuda = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE
    distributed = launched_processes() > 1
    cpu = distributed and no_cuda and not deepspeed_launch()
    settings = {"timeout": PROCESS_GROUP_TIMEOUT}
    if distributed and no_cuda:
        settings["backend"] = "gloo"
    return cpu, settings


def process_state() -> PartialState:
    """This process's place among those launched (rank, world size, device), process group joined."""
    cpu, settings = _process_group_settings()
    return PartialState(cpu=cpu, **settings)


def training_accelerator(*, mixed_precision: str, grad_accum_steps: int) -> Accelerator:
    """The Accelerator of a training run: one process, DDP or DeepSpeed (as launched)."""
    cpu, settings = _process_group_settings()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum_steps,
                       kwargs_handlers=[InitProcessGroupKwargs(**settings)])


def end_processes(state: PartialState | Accelerator | None = None) -> None:
    """Leave the process group cleanly.

    Callers drop their references to wrapped models and optimizers first; then memory is
    freed, garbage collected and the group destroyed, which avoids the abort that gloo
    otherwise raises at exit in a fraction of multi-process runs.
    """
    if isinstance(state, Accelerator):
        state.free_memory()
    gc.collect()
    if isinstance(state, Accelerator):
        state.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_with_launcher() -> None:
    """Make this process die with its launcher (Linux).

    torchrun starts every rank in its own session, so if ``accelerate launch`` itself is
    killed (``kill -9``, the OOM killer), the ranks would go on, orphaned, and race a re-run
    of the command in the same run directory.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before that line
        os._exit(1)
