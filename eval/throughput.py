"""Throughput and cost benchmarks: ``python -m eval.throughput <benchmark> key=value ...``.

    python -m eval.throughput attention tokens=[1024,4096,16384] dtype=bfloat16   # attention cores vs N
    python -m eval.throughput train model=S sizes=[16,32]                          # DiT training step per variant
    python -m eval.throughput sample model=tiny                                    # sampling latency per video
    python -m eval.throughput suite budget_s=480 out=<dir>                         # the GPU suite (quick=true: CPU)

The leading word selects ``configs/benchmark/<benchmark>.yaml`` (it is ``benchmark=<name>``),
which holds that benchmark's keys and defaults. Every result records the command, device,
date and commit (:mod:`eval.benchmark`) and is written as JSON, markdown and a plot.
"""

from __future__ import annotations

import signal
import sys

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from configs.entry import entry_point
from eval.attention_benchmark import run_attention
from eval.dit_benchmark import run_sample, run_train
from eval.suite import run_suite

BENCHMARKS = {"attention": run_attention, "train": run_train, "sample": run_sample, "suite": run_suite}


def invoked_command(cfg: DictConfig) -> str:
    """The command line that produced ``cfg`` (as the user would type it), for the result's provenance."""
    command = f"python -m eval.throughput {cfg.benchmark}"
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("benchmark=")]
        return " ".join([command, *overrides])
    return command + " (composed in-process)"


def run(cfg: DictConfig) -> dict:
    """Run the benchmark a checked ``throughput`` config selects; returns its JSON-able result."""
    return BENCHMARKS[cfg.benchmark](cfg, invoked_command(cfg))


main = entry_point("throughput", positional_key="benchmark")(run)


if __name__ == "__main__":
    # Turn SIGTERM into SystemExit so that a running measurement subprocess is killed with us.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    main()
