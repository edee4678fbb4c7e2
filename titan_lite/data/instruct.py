"""Instruction data (fine-tuning): records -> a cached (tokens, target mask) per sample ->
packed rows whose samples never see each other.

Each sample is rendered once by the chat template into ids and a per-token target flag and
cached (``<source>.<hash>.sft/``: the arrays tokens, targets and lengths, built in parts as
``shards.build_cache`` builds). At start-up the samples are measured (length report), over-long
ones dropped or truncated, and the rest packed in file order into rows of ``seq_len``
positions. A sample's positions restart at 0, which is what keeps attention inside it; the
label that would cross into the next sample and padding are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from titan_lite.data.batch import Batch
from titan_lite.data.chat import ChatTemplate, record_messages
from titan_lite.data.shards import (CacheJob, Items, Stream, batched, build_cache, fail,
                                    read_manifest)
from titan_lite.data.sources import (RECORD_SUFFIXES, PartReader, describe_files, plan_parts,
                                     require_object, source_files)
from titan_lite.data.text import TOKEN_DTYPE, cache_path
from titan_lite.loss import IGNORE_INDEX

_CACHE_VERSION = "sft-3"  # bump when what is cached changes
_BATCH_RECORDS = 256


@dataclass(frozen=True)
class Rendering:
    """How records become samples; everything here changes the cache."""
    data_format: str  # alpaca | chat
    template: ChatTemplate
    train_on_prompt: bool

    def settings(self) -> str:
        return f"{_CACHE_VERSION}:{self.data_format}:{self.template.name}:{self.train_on_prompt}"

    def encode(self, batch: Items) -> dict[str, np.ndarray]:
        """A batch of records as samples: their tokens, target flags and lengths."""
        tokens: list[int] = []
        targets: list[bool] = []
        lengths: list[int] = []
        for location, record in batch:
            try:
                messages = record_messages(require_object(location, record), self.data_format)
                ids, is_target = self.template.render(messages, self.train_on_prompt)
            except ValueError as e:  # (require_object's message names the place already)
                message = str(e)
                raise ValueError(message if message.startswith(location)
                                 else f"{location}: {message}") from None
            tokens += ids
            targets += is_target
            lengths.append(len(ids))
        return {"tokens": np.asarray(tokens, dtype=TOKEN_DTYPE),
                "targets": np.asarray(targets, dtype=np.uint8),
                "lengths": np.asarray(lengths, dtype=np.uint32)}


def tokenize_samples_to_cache(paths: list[str], rendering: Rendering, cache_dir: str = "",
                              key: str = "data.paths",
                              log: Callable[[str], None] | None = print, workers: int = 1,
                              shard_mb: float = 64) -> str:
    """Render and tokenize every record once; returns the cache folder (reused when it exists;
    built as ``shards.build_cache`` builds). A bad record raises ValueError naming the file,
    line (or row) and field; nothing is left behind."""
    files = source_files(paths, RECORD_SUFFIXES, key)
    job = CacheJob(
        cache=cache_path(files, rendering.template.tokenizer, rendering.settings(), cache_dir,
                         ".sft"),
        plan=lambda: [part for file in files for part in plan_parts(file,
                                                                    int(shard_mb * 2**20))],
        batches=lambda part: batched(PartReader(part), lambda record: 1, _BATCH_RECORDS),
        encode=rendering.encode,
        describe=f"tokenizing {rendering.data_format} samples of {key} "
                 f"({describe_files(files)})")
    cache = build_cache(job, workers, log)
    if sample_count(cache) == 0:
        message = f"{key}: no records in {', '.join(files)}"
        fail(cache, message)
        raise ValueError(message)
    return cache


def length_report(lengths: np.ndarray, seq_len: int, overlong: str, dropped: int,
                  truncated: int, rows: int, fill: float) -> str:
    """Tokens per sample and what became of the ones that do not fit, for the log."""
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
    over = int((lengths > seq_len + 1).sum())
    fate = (f"dropped {dropped}" if overlong == "drop"
            else f"truncated {truncated}, dropped {dropped} left without an answer")
    return (f"{len(lengths):,} samples, tokens per sample min {lengths.min()} / p50 {p50} / p90 "
            f"{p90} / p99 {p99} / max {lengths.max()}; {over} longer than training.seq_len "
            f"{seq_len} (+1 shifted target): {fate} (data.overlong = {overlong!r}); packed "
            f"into {rows:,} rows, {100 * fill:.1f}% of positions used")


def sample_count(cache: str) -> int:
    return read_manifest(cache)["counts"].get("lengths", 0)


class PackedSamples:
    """Cached samples packed into rows of ``seq_len`` positions (next fit, in file order).

    ``indices`` keeps only those samples (a validation split); ``overlong`` 'drop' or
    'truncate' handles samples with more than seq_len + 1 tokens. ``report`` says what
    happened, for the log.
    """

    def __init__(self, cache: str, seq_len: int, overlong: str,
                 indices: np.ndarray | None = None, key: str = "data.paths"):
        self.tokens = Stream(cache, "tokens", TOKEN_DTYPE)
        self.targets = Stream(cache, "targets", np.uint8)
        lengths = Stream(cache, "lengths", np.uint32).read().astype(np.int64)
        starts = np.cumsum(lengths) - lengths
        if indices is not None:
            starts, lengths = starts[indices], lengths[indices]
        self.seq_len = seq_len
        self.spans, dropped, truncated = self._fit(starts, lengths, overlong)
        if not self.spans:
            raise ValueError(f"{key}: none of the {len(lengths)} samples fits training.seq_len "
                             f"{seq_len} with an answer left (longest "
                             f"{lengths.max() if len(lengths) else 0} tokens); raise "
                             "training.seq_len or use data.overlong = \"truncate\"")
        self.row_spans = self._pack([length for _, length in self.spans])
        self.num_rows = len(self.row_spans)
        used = sum(length - 1 for _, length in self.spans)
        self.report = length_report(lengths, seq_len, overlong, dropped, truncated,
                                    self.num_rows, used / (self.num_rows * seq_len))
        self.describe = f"{len(self.spans)} samples packed into {self.num_rows} rows"

    def _fit(self, starts: np.ndarray, lengths: np.ndarray, overlong: str
             ) -> tuple[list[tuple[int, int]], int, int]:
        """(start, length) of the samples kept, and how many were dropped and truncated."""
        limit = self.seq_len + 1  # seq_len inputs plus the last one's shifted target
        spans, dropped, truncated = [], 0, 0
        for start, length in zip(starts.tolist(), lengths.tolist()):
            if length > limit:
                if overlong == "drop":
                    dropped += 1
                    continue
                length = limit
                truncated += 1
            if not self.targets[start + 1:start + length].any():  # nothing left to learn
                dropped += 1
                continue
            spans.append((start, length))
        return spans, dropped, truncated

    def _pack(self, lengths: list[int]) -> list[range]:
        """Which spans go into each row: consecutive samples while their inputs fit."""
        rows, first, used = [], 0, 0
        for index, length in enumerate(lengths):
            if used + length - 1 > self.seq_len:
                rows.append(range(first, index))
                first, used = index, 0
            used += length - 1
        rows.append(range(first, len(lengths)))
        return rows

    def _row(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        inputs = np.zeros(self.seq_len, dtype=np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(self.seq_len, dtype=np.int64)
        at = 0
        for start, length in (self.spans[i] for i in (self.row_spans[row] if row >= 0 else ())):
            ids = self.tokens[start:start + length].astype(np.int64)
            end = at + length - 1
            inputs[at:end] = ids[:-1]
            labels[at:end] = np.where(self.targets[start + 1:start + length], ids[1:],
                                      IGNORE_INDEX)
            positions[at:end] = np.arange(length - 1)
            at = end
        positions[at:] = np.arange(self.seq_len - at)  # padding: a sample of its own
        return inputs, labels, positions

    def batch(self, rows: np.ndarray) -> Batch:
        inputs, labels, positions = (torch.from_numpy(np.stack(parts))
                                     for parts in zip(*(self._row(int(r)) for r in rows)))
        return Batch(inputs, labels, positions)
