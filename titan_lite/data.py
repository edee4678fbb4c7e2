"""Local text corpora -> a cached uint32 token file -> packed, rank-sharded, resumable batches."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from titan_lite.tokenizer import Tokenizer

TOKEN_DTYPE = np.uint32
_PROGRESS_EVERY_S = 5.0


def corpus_files(paths: list[str]) -> list[str]:
    """The .txt/.jsonl files named by ``paths``: files as given, folders searched and sorted."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            found = [path]
        else:
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names)
        found = [f for f in found if f.endswith((".txt", ".jsonl"))]
        if not found:
            raise ValueError(f"data.paths: no .txt or .jsonl files in {path!r}")
        files += found
    return files


def iter_documents(files: list[str], text_field: str) -> Iterator[tuple[str, int]]:
    """Yield (document text, bytes of the source consumed so far, for progress)."""
    done = 0
    for file in files:
        if file.endswith(".txt"):
            with open(file, encoding="utf-8") as fh:
                text = fh.read()
            done += os.path.getsize(file)
            yield text, done
            continue
        with open(file, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                done += len(line.encode("utf-8"))
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{file}:{line_no}: expected a JSON object with a "
                                     f"{text_field!r} string field ({e})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{file}:{line_no}: field {text_field!r} is not a string")
                yield text, done


def _cache_path(files: list[str], tokenizer_path: str, text_field: str, cache_dir: str) -> str:
    """Cache name keyed on the sources (path, size, mtime) and the tokenizer's contents."""
    digest = hashlib.sha256(text_field.encode())
    with open(tokenizer_path, "rb") as fh:
        digest.update(fh.read())
    for file in files:
        stat = os.stat(file)
        digest.update(f"{os.path.abspath(file)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    folder = cache_dir or os.path.dirname(os.path.abspath(files[0]))
    name = f"{os.path.basename(files[0])}.{digest.hexdigest()[:16]}.tokens.u32"
    return os.path.join(folder, name)


def tokenize_to_cache(paths: list[str], tokenizer: Tokenizer, tokenizer_path: str,
                      text_field: str = "text", cache_dir: str = "", log=print) -> str:
    """Tokenize the corpus once into a flat uint32 file: bos + document + eos, back to back.

    Returns the cache file's path; an existing cache for the same contents is reused. The file is
    written under a temporary name and renamed, so a crash never leaves a half-written cache.
    """
    files = corpus_files(paths)
    cache = _cache_path(files, tokenizer_path, text_field, cache_dir)
    if os.path.exists(cache):
        return cache
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError("tokenizer vocab does not fit in uint32")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    total = sum(os.path.getsize(f) for f in files)
    tmp = f"{cache}.tmp{os.getpid()}"
    n_tokens, last_report = 0, time.monotonic()
    with open(tmp, "wb") as out:
        for text, done in iter_documents(files, text_field):
            ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=TOKEN_DTYPE)
            ids.tofile(out)
            n_tokens += ids.size
            if time.monotonic() - last_report > _PROGRESS_EVERY_S:
                log(f"tokenizing {files[0]}...: {100 * done / total:.0f}% ({n_tokens:,} tokens)")
                last_report = time.monotonic()
    os.replace(tmp, cache)
    log(f"tokenized {len(files)} file(s): {n_tokens:,} tokens -> {cache}")
    return cache


class PackedDataLoader:
    """Fixed-length samples cut from the token stream, sharded over data-parallel ranks.

    Sample i holds tokens[i*seq_len : (i+1)*seq_len + 1] (input plus the shifted target), so
    documents are packed across sample boundaries with their bos/eos separators. Each epoch
    visits every sample once in a seeded order; rank r of n takes the order's positions
    r, r+n, r+2n, ... so ranks never see the same sample in an epoch. The position in that order
    is the whole state: ``state_dict``/``load_state_dict`` resume at the exact next batch.
    """

    def __init__(self, token_file: str, seq_len: int, batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.tokens = np.memmap(token_file, dtype=TOKEN_DTYPE, mode="r")
        self.seq_len, self.batch_size = seq_len, batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.num_samples = (len(self.tokens) - 1) // seq_len
        self.batches_per_epoch = self.num_samples // dp_size // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"corpus too small: {len(self.tokens):,} tokens make "
                             f"{self.num_samples} samples of seq_len {seq_len}, fewer than "
                             f"{batch_size} per rank x {dp_size} data-parallel ranks")
        self.epoch, self.batch_in_epoch = 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, this rank's sample order)

    def _rank_order(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            order = np.arange(self.num_samples)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
            self._order = (self.epoch, order[self.dp_rank::self.dp_size])
        return self._order[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), each (batch_size, seq_len) int64, on CPU."""
        if self.batch_in_epoch == self.batches_per_epoch:
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        mine = self._rank_order()
        first = self.batch_in_epoch * self.batch_size
        starts = mine[first:first + self.batch_size] * self.seq_len
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        self.batch_in_epoch += 1
        batch = torch.from_numpy(rows)
        return batch[:, :-1], batch[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """The position as the whole job sees it: the samples of the epoch's order consumed by
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
