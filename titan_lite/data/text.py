"""Plain text corpora (pretraining): a cached uint32 token stream cut into fixed-length rows."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator

import numpy as np
import torch

from titan_lite.data.batch import Batch
from titan_lite.data.records import json_lines, read_text
from titan_lite.loss import IGNORE_INDEX
from titan_lite.tokenizer import Tokenizer

TOKEN_DTYPE = np.uint32
_PROGRESS_EVERY_S = 5.0
_BATCH_CHARS = 4_000_000  # per batch handed to the tokenizer's threads (a few MB of text)


def corpus_files(paths: list[str], suffixes: tuple[str, ...] = (".txt", ".jsonl"),
                 key: str = "data.paths") -> list[str]:
    """The files with ``suffixes`` named by ``paths``: files as given, folders searched and
    sorted."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            found = [path]
        else:
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                           for name in names)
        found = [f for f in found if f.endswith(suffixes)]
        if not found:
            raise ValueError(f"{key}: no {' or '.join(suffixes)} files in {path!r}")
        files += found
    return files


def iter_documents(files: list[str], text_field: str) -> Iterator[tuple[str, int]]:
    """Yield (document text, bytes of the source consumed so far, for progress)."""
    done = 0
    for file in files:
        if file.endswith(".txt"):
            text = read_text(file)
            done += os.path.getsize(file)
            yield text, done
            continue
        for line_no, record, read in json_lines(file):
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{file}:{line_no}: expected a JSON object with a "
                                 f"{text_field!r} string field")
            yield text, done + read
        done += os.path.getsize(file)


def cache_path(files: list[str], tokenizer: Tokenizer, settings: str, cache_dir: str,
               suffix: str) -> str:
    """Cache name keyed on the sources (path, size, mtime), the tokenizer (the engine that
    reads it, the contents of its files, its bos/eos ids) and the ``settings`` that change what
    is cached."""
    digest = hashlib.sha256(f"{settings}:{type(tokenizer).__name__}:{tokenizer.bos_id}:"
                            f"{tokenizer.eos_id}".encode())
    for tokenizer_file in tokenizer.files:
        with open(tokenizer_file, "rb") as fh:
            digest.update(fh.read())
    for file in files:
        stat = os.stat(file)
        digest.update(f"{os.path.abspath(file)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    folder = cache_dir or os.path.dirname(os.path.abspath(files[0]))
    return os.path.join(folder, f"{os.path.basename(files[0])}.{digest.hexdigest()[:16]}{suffix}")


def tokenize_to_cache(paths: list[str], tokenizer: Tokenizer, text_field: str = "text",
                      cache_dir: str = "", log=print) -> str:
    """Tokenize the corpus once into a flat uint32 file: bos + document + eos, back to back.

    Returns the cache file's path; an existing cache for the same contents is reused. The file is
    written under a temporary name and renamed, so a crash never leaves a half-written cache.
    """
    files = corpus_files(paths)
    cache = cache_path(files, tokenizer, text_field, cache_dir, ".tokens.u32")
    if os.path.exists(cache):
        return cache
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError("tokenizer vocab does not fit in uint32")
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    total = sum(os.path.getsize(f) for f in files)
    tmp = f"{cache}.tmp{os.getpid()}"
    n_tokens, last_report = 0, time.monotonic()
    with open(tmp, "wb") as out:
        for texts, done in _batches(iter_documents(files, text_field)):
            for ids in tokenizer.encode_batch(texts, bos=True, eos=True):
                np.asarray(ids, dtype=TOKEN_DTYPE).tofile(out)
                n_tokens += len(ids)
            if time.monotonic() - last_report > _PROGRESS_EVERY_S:
                log(f"tokenizing {files[0]}...: {100 * done / total:.0f}% ({n_tokens:,} tokens)")
                last_report = time.monotonic()
    os.replace(tmp, cache)
    log(f"tokenized {len(files)} file(s): {n_tokens:,} tokens -> {cache}")
    return cache


def _batches(documents: Iterator[tuple[str, int]], max_chars: int = _BATCH_CHARS
             ) -> Iterator[tuple[list[str], int]]:
    """Documents grouped for batch encoding, up to ``max_chars`` characters a batch, with the
    bytes read so far after each batch."""
    texts, size, done = [], 0, 0
    for text, done in documents:
        texts.append(text)
        size += len(text)
        if size >= max_chars:
            yield texts, done
            texts, size = [], 0
    if texts:
        yield texts, done


class TextRows:
    """Row i of the token stream holds tokens[i*seq_len : (i+1)*seq_len + 1] (input plus the
    shifted target), so documents are packed across rows with their bos/eos separators and
    attend to each other, as in pretraining. ``indices`` keeps only those rows (a split)."""

    def __init__(self, token_file: str, seq_len: int, indices: np.ndarray | None = None):
        self.tokens = np.memmap(token_file, dtype=TOKEN_DTYPE, mode="r")
        self.seq_len = seq_len
        total = (len(self.tokens) - 1) // seq_len
        self.indices = np.arange(total) if indices is None else indices
        self.num_rows = len(self.indices)
        self.describe = (f"{len(self.tokens):,} tokens make {total} rows of seq_len {seq_len}")

    def batch(self, rows: np.ndarray) -> Batch:
        """The rows (-1: an empty row with no targets) as one batch."""
        out = np.zeros((len(rows), self.seq_len + 1), dtype=np.int64)
        labels_ignored = rows < 0
        for i, row in enumerate(rows):
            if row >= 0:
                start = self.indices[row] * self.seq_len
                out[i] = self.tokens[start:start + self.seq_len + 1]
        tokens = torch.from_numpy(out)
        labels = tokens[:, 1:].clone()
        labels[torch.from_numpy(labels_ignored)] = IGNORE_INDEX
        return Batch(tokens[:, :-1], labels)
