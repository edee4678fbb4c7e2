"""Rows -> rank-sharded, shuffled, resumable training batches; and validation batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from titan_lite.data.batch import Batch, Rows


def split_indices(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out): a seeded, deterministic ``fraction`` of range(count) held out (at
    least one item), both in their original order."""
    held = np.random.default_rng([seed, 0x5EED]).permutation(count)[:max(1, round(fraction
                                                                                  * count))]
    is_held = np.zeros(count, dtype=bool)
    is_held[held] = True
    return np.flatnonzero(~is_held), np.flatnonzero(is_held)


class PackedDataLoader:
    """Training batches of ``batch_size`` rows, sharded over data-parallel ranks.

    Each epoch visits every row once in a seeded order; rank r of n takes the order's positions
    r, r+n, r+2n, ... so ranks never see the same row in an epoch. The position in that order
    is the whole state: ``state_dict``/``load_state_dict`` resume at the exact next batch.
    """

    def __init__(self, rows: Rows, batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        self.rows, self.batch_size = rows, batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.num_samples = rows.num_rows
        self.batches_per_epoch = self.num_samples // dp_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"data set too small: {rows.describe}, fewer than {batch_size} "
                             f"per rank x {dp_size} data-parallel ranks")
        self.epoch, self.batch_in_epoch = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this rank's row order)

    def _rank_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = np.arange(self.num_samples)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
            self._order = (self.epoch, order[self.dp_rank::self.dp_size])
        return self._order[1]

    def next_batch(self) -> Batch:
        """The next batch of this rank, on CPU."""
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        first = self.batch_in_epoch * self.batch_size
        self.batch_in_epoch += 1
        return self.rows.batch(self._rank_order()[first:first + self.batch_size])

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The position as the whole job sees it: the rows of the epoch's order consumed by
        all data-parallel ranks together, so a run can resume with another number of ranks."""
        return {"epoch": self.epoch,
                "samples_in_epoch": self.batch_in_epoch * self.batch_size * self.dp_size,
                "num_samples": self.num_samples, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at the next batch; works with any split of the same global batch over ranks
        (each step covers the same slice of the epoch's order whatever the split)."""
        for key in ("num_samples", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data loader state was saved with {key}={state[key]}, "
                                 f"this run has {getattr(self, key)}")
        global_batch = self.batch_size * self.dp_size
        if state["samples_in_epoch"] % global_batch:
            raise ValueError(f"data loader state is {state['samples_in_epoch']} samples into the "
                             f"epoch, not a whole number of this run's global batches of "
                             f"{global_batch}: resume with the same global batch size")
        self.epoch = state["epoch"]
        self.batch_in_epoch = state["samples_in_epoch"] // global_batch


class ValidationLoader:
    """Every validation row once, in order, ``batch_size`` per rank per batch. Every rank runs
    the same number of batches (sharded layouts need each forward on every rank): the rows
    that do not divide evenly are padded with empty rows, which hold no targets."""

    def __init__(self, rows: Rows, batch_size: int, dp_rank: int, dp_size: int,
                 max_batches: int = -1):
        self.rows, self.batch_size, self.dp_rank, self.dp_size = rows, batch_size, dp_rank, dp_size
        self.num_batches = math.ceil(rows.num_rows / (batch_size * dp_size))
        if max_batches > 0:
            self.num_batches = min(self.num_batches, max_batches)

    def __iter__(self) -> Iterator[Batch]:
        for index in range(self.num_batches):
            first = (index * self.dp_size + self.dp_rank) * self.batch_size
            rows = np.arange(first, first + self.batch_size)
            yield self.rows.batch(np.where(rows < self.rows.num_rows, rows, -1))
