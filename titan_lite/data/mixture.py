"""Several sources drawn by sampling weights (``data.weights``), as pretraining mixes corpora.

An epoch of the mixture is the smallest number of rows in which every source gets its share
and every row of every source comes at least once: source s contributes n_s = share_s x total
rows, cycling through its own rows (a source with a large weight and few rows repeats). The
mixture is a fixed list of rows, so the loader's seeded shuffle, rank sharding and exact
resume apply to it unchanged.
"""

from __future__ import annotations

import math

import numpy as np

from titan_lite.data.batch import Batch, Rows


class MixedRows:
    """``sources`` (each a ``Rows``) mixed by ``weights`` (any positive numbers: their shares
    are weight / sum); ``names`` label them in ``report``."""

    def __init__(self, sources: list[Rows], weights: list[float], names: list[str]):
        shares = np.asarray(weights, dtype=np.float64) / sum(weights)
        sizes = np.asarray([source.num_rows for source in sources], dtype=np.int64)
        total = max(math.ceil(size / share) for size, share in zip(sizes, shares))
        self.counts = np.maximum(np.round(shares * total).astype(np.int64), sizes)
        self.sources = sources
        self.ends = np.cumsum(self.counts)
        self.num_rows = int(self.ends[-1])
        parts = [f"{name} {100 * count / self.num_rows:.1f}% ({count:,} rows from {size:,}, "
                 f"x{count / size:.2f})" for name, count, size in zip(names, self.counts, sizes)]
        self.report = f"mixture of {len(sources)} sources, {self.num_rows:,} rows an epoch: " + (
            "; ".join(parts))
        self.describe = f"{self.num_rows} rows mixed from {len(sources)} sources"

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, row within it) of each mixture row."""
        source = np.searchsorted(self.ends, rows, side="right")
        first = np.concatenate([[0], self.ends[:-1]])[source]
        sizes = np.asarray([s.num_rows for s in self.sources])[source]
        return source, (rows - first) % sizes

    def batch(self, rows: np.ndarray) -> Batch:
        """The rows (-1: empty) as one batch, each from its source."""
        rows = np.asarray(rows, dtype=np.int64)
        source, inner = self.locate(np.maximum(rows, 0))
        batches = [self.sources[s].batch(np.asarray([r if row >= 0 else -1]))
                   for s, r, row in zip(source.tolist(), inner.tolist(), rows.tolist())]
        return Batch.stack(batches)
