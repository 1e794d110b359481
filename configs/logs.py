"""Messages and progress bars, the same way in every entry point.

* Messages go through stdlib ``logging`` (``get_logger(__name__)``). Hydra's job logging
  (``configs/hydra/job_logging/linvid.yaml``) sends them to stdout as plain lines, and
  :class:`RankZeroFilter` drops them on every process but rank 0, so a multi-process run
  prints each message once. Warnings are ``logger.warning``; errors are exceptions.
* Progress is a tqdm bar on stderr (:func:`progress`), shown by rank 0 only.

Library code used outside an entry point (tests, notebooks) logs through the same
loggers; without Hydra's configuration, warnings reach stderr and info is silent.
"""

from __future__ import annotations

import logging
import os

from tqdm import tqdm


def process_rank() -> int:
    """This process's global rank under ``accelerate launch`` / torchrun (0 when alone)."""
    return int(os.environ.get("RANK", "0"))


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (``get_logger(__name__)``)."""
    return logging.getLogger(name)


class RankZeroFilter(logging.Filter):
    """Let records through on rank 0 only (installed on the console handler by Hydra)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0


def progress(*, total: int | None, desc: str, initial: int = 0, unit: str = "it") -> tqdm:
    """A tqdm progress bar on stderr, disabled on every process but rank 0."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=process_rank() != 0)
