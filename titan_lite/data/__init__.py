"""Training and validation data: plain text (pretraining) or instruction records (fine-tuning),
tokenized once into a cache (ahead of time with ``python -m titan_lite.data prepare``, or by
every rank together at start-up), cut or packed into rows, sharded over data-parallel ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from titan_lite.config import JobConfig
from titan_lite.data.batch import Batch, Rows
from titan_lite.data.chat import ChatTemplate
from titan_lite.data.chat_templates import build_chat_template
from titan_lite.data.instruct import (
    PackedSamples,
    Rendering,
    sample_count,
    tokenize_samples_to_cache,
)
from titan_lite.data.loader import PackedDataLoader, ValidationLoader, split_indices
from titan_lite.data.mixture import MixedRows
from titan_lite.data.sources import source_files
from titan_lite.data.text import TextRows, tokenize_to_cache
from titan_lite.runtime.distributed import on_every_rank
from titan_lite.data.tokenizer import Tokenizer, usable_cores

__all__ = ["Batch", "ChatTemplate", "Data", "PackedDataLoader", "PackedSamples", "Rows",
           "TextRows", "ValidationLoader", "build_chat_template", "build_data", "data_caches",
           "source_files", "tokenize_samples_to_cache", "tokenize_to_cache"]


@dataclass
class Data:
    train: PackedDataLoader
    validation: ValidationLoader | None


def _cached(cfg: JobConfig, tokenizer: Tokenizer, paths: list[str], key: str,
            log: Callable[[str], None] | None, workers: int) -> str:
    """Tokenize ``paths`` (``key`` names them in errors) into the cache; its path."""
    d = cfg.data
    if d.format == "text":
        return tokenize_to_cache(paths, tokenizer, d.text_field, d.cache_dir, log, workers,
                                 d.shard_mb, key)
    template = build_chat_template(d.chat_template, tokenizer, cfg.tokenizer.path)
    if log is not None:
        log(f"chat template: {template.describe}")
    rendering = Rendering(d.format, template, d.train_on_prompt)
    return tokenize_samples_to_cache(paths, rendering, d.cache_dir, key, log, workers,
                                     d.shard_mb)


def encode_workers(cfg: JobConfig, builders: int = 1) -> int:
    """Processes each of ``builders`` builders encodes with: data.workers, or its share of the
    cores (0)."""
    if cfg.data.workers > 0:
        return cfg.data.workers
    return max(1, usable_cores() // builders)


def data_caches(cfg: JobConfig, tokenizer: Tokenizer, log: Callable[[str], None] | None,
                builders: int = 1) -> tuple[list[str], str | None]:
    """The training caches (one per source of a mixture, else one) and the validation cache,
    built now unless a prepared one is there; every caller is a builder, sharing the work with
    the others (``builders`` on this host)."""
    workers = encode_workers(cfg, builders)
    sources = [[path] for path in cfg.data.paths] if cfg.data.weights else [cfg.data.paths]
    train = [_cached(cfg, tokenizer, paths, "data.paths", log, workers) for paths in sources]
    held = (_cached(cfg, tokenizer, cfg.validation.paths, "validation.paths", log, workers)
            if cfg.validation.paths else None)
    return train, held


def _rows(cfg: JobConfig, cache: str, indices=None, key: str = "data.paths",
          paths: list[str] | None = None) -> Rows:
    """The rows of ``cache``; ``key`` and its ``paths`` (files or folders, as configured) name
    the data in errors."""
    if cfg.data.format == "text":
        return TextRows(cache, cfg.training.seq_len, indices)
    source = f"{key} ({', '.join(paths if paths is not None else cfg.data.paths)})"
    return PackedSamples(cache, cfg.training.seq_len, cfg.data.overlong, indices, source)


def _training_rows(cfg: JobConfig, caches: list[str]) -> Rows:
    """One corpus's rows, or the mixture of the sources' rows by data.weights."""
    if not cfg.data.weights:
        return _rows(cfg, caches[0])
    sources = [_rows(cfg, cache, paths=[path]) for cache, path in zip(caches, cfg.data.paths)]
    return MixedRows(sources, cfg.data.weights, cfg.data.paths)


def _split(cfg: JobConfig, cache: str) -> tuple[Rows, Rows]:
    """Training and validation rows when validation.split holds out part of the data: text
    rows, or instruction samples before they are packed."""
    text = cfg.data.format == "text"
    count = TextRows(cache, cfg.training.seq_len).num_rows if text else sample_count(cache)
    kept, held = split_indices(count, cfg.validation.split, cfg.job.seed)
    if len(kept) == 0:
        raise ValueError(f"validation.split: holding out {len(held)} of {count} "
                         f"{'rows' if text else 'samples'} leaves none to train on")
    return _rows(cfg, cache, kept), _rows(cfg, cache, held, "validation.split")


def build_data(cfg: JobConfig, tokenizer: Tokenizer, local_rank: int, dp_rank: int,
               dp_size: int, log: Callable[[str], None]) -> Data:
    """Tokenize once (every rank of a host building a share, rank 0 reporting), then open
    this rank's shard of the training and validation rows. Bad data stops every rank with the
    same one-line message."""
    return on_every_rank(lambda: _open_data(cfg, tokenizer, local_rank, dp_rank, dp_size, log))


def _open_data(cfg: JobConfig, tokenizer: Tokenizer, local_rank: int, dp_rank: int,
               dp_size: int, log: Callable[[str], None]) -> Data:
    v = cfg.validation
    builders = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    train_caches, held_cache = data_caches(cfg, tokenizer, log if local_rank == 0 else None,
                                           builders)
    if v.split > 0:
        train_rows, held_rows = _split(cfg, train_caches[0])
    else:
        train_rows = _training_rows(cfg, train_caches)
        held_rows = (_rows(cfg, held_cache, key="validation.paths", paths=v.paths)
                     if held_cache else None)
    for name, rows in (("training", train_rows), ("validation", held_rows)):
        if isinstance(rows, (PackedSamples, MixedRows)):
            log(f"{name} data: {rows.report}")
    batch = cfg.training.local_batch_size
    train = PackedDataLoader(train_rows, batch, dp_rank, dp_size, cfg.job.seed,
                             cfg.data.shuffle)
    validation = None if held_rows is None else ValidationLoader(held_rows, batch, dp_rank,
                                                                  dp_size, v.steps)
    return Data(train, validation)
