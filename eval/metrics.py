"""A run's metrics: written during training to ``metrics.jsonl`` (+ tensorboard or wandb), read by reports.

Each line of ``<run dir>/metrics.jsonl`` is one JSON record ``{"step": int, <name>: number, ...}``.
Only rank 0 writes. wandb runs offline automatically when there is no ``WANDB_API_KEY``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """metrics.jsonl in the run directory, plus tensorboard or wandb (``logger`` config). Rank 0 only."""

    def __init__(self, cfg: DictConfig, run_dir: Path, enabled: bool):
        self.enabled, self.backend, self.run = enabled, cfg.logger.name, None
        if not enabled:
            return
        self.jsonl = open(run_dir / METRICS_FILE, "a")
        if self.backend == "tensorboard":
            from torch.utils.tensorboard import (
                SummaryWriter,  # optional backends are imported when chosen
            )

            self.run = SummaryWriter(str(run_dir / "tensorboard"))
        elif self.backend == "wandb":
            import wandb

            mode = cfg.logger.mode
            if mode == "auto":
                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
            self.run = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, dir=str(run_dir), mode=mode,
                config=OmegaConf.to_container(cfg, resolve=True), id=run_dir.resolve().name.replace("=", "-"),
                resume="allow",
            )

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.backend == "tensorboard":
            for key, value in metrics.items():
                self.run.add_scalar(key, value, step)
        elif self.backend == "wandb":
            self.run.log(metrics, step=step)

    def log_video(self, step: int, path: Path) -> None:
        if self.enabled and self.backend == "wandb":
            import wandb

            self.run.log({"samples": wandb.Video(str(path), format="mp4")}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.backend == "tensorboard":
            self.run.close()
        elif self.backend == "wandb":
            self.run.finish()


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's ``metrics.jsonl`` (empty when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
