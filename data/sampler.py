"""A resumable, rank-aware sample stream whose position is counted in samples.

All processes share one global stream of samples: epoch e is a permutation of the
dataset drawn from (seed, e), and global sample i is element i mod len of epoch
i div len. Every optimizer micro-step consumes one global batch of
``world_size × batch_size`` consecutive stream entries; rank r takes its slice
[r·batch_size, (r+1)·batch_size) of it. The training state stores only the global
position (samples consumed), so a run can resume with a different number of
processes without repeating or skipping samples.

Each entry is a key ``(dataset_index, sample_seed)``: the per-sample seed drives
random clip starts and depends only on (seed, global position).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def sample_seed(seed: int, position: int) -> int:
    """Seed for the sample at a global stream position."""
    return int(np.random.SeedSequence([seed, position, 0x5EED]).generate_state(1)[0])


class SampleStream(Sampler):
    """Infinite stream of ``(index, sample_seed)`` keys for one rank.

    Args:
        dataset_size: number of samples in the dataset.
        seed: run seed.
        batch_size: per-rank batch size.
        rank, world_size: this process and the number of processes.
        start: global position (samples consumed by all ranks) to start from.
        shuffle: permute each epoch (False: dataset order).
    """

    def __init__(self, dataset_size: int, *, seed: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 start: int = 0, shuffle: bool = True):
        if dataset_size < 1:
            raise ValueError("SampleStream needs a non-empty dataset")
        self.dataset_size, self.seed, self.batch_size = dataset_size, seed, batch_size
        self.rank, self.world_size, self.start, self.shuffle = rank, world_size, start, shuffle
        self._epoch, self._order = None, None

    def epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._order = rng.permutation(self.dataset_size)
            else:
                self._order = np.arange(self.dataset_size)
            self._epoch = epoch
        return self._order

    def key(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(position, self.dataset_size)
        return int(self.epoch_order(epoch)[offset]), sample_seed(self.seed, position)

    def positions(self) -> Iterator[int]:
        """Global positions this rank reads, in order."""
        global_batch = self.batch_size * self.world_size
        batch_start = self.start
        while True:
            first = batch_start + self.rank * self.batch_size
            yield from range(first, first + self.batch_size)
            batch_start += global_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return (self.key(p) for p in self.positions())

    def __len__(self) -> int:  # DataLoader only needs this to exist for infinite samplers
        return 2**62


def sample_stream_loader(dataset, stream: SampleStream, *, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader yielding per-rank batches in stream order."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=stream.batch_size,
        sampler=stream,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        drop_last=True,
    )
