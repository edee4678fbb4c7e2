"""Plain text corpora (pretraining): a cached uint32 token stream cut into fixed-length rows."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from titan_lite.data.batch import Batch
from titan_lite.data.shards import CacheJob, Items, Stream, batched, build_cache
from titan_lite.data.sources import (CutFinder, Part, PartReader, Piece, describe_files,
                                     plan_parts, source_files)
from titan_lite.loss import IGNORE_INDEX
from titan_lite.data.tokenizer import Tokenizer, safe_cut

TOKEN_DTYPE = np.uint32
_CACHE_VERSION = "text-2"  # bump when what is cached changes
_BATCH_CHARS = 4_000_000  # per batch handed to the tokenizer (a few MB of text)


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
                      cache_dir: str = "", log: Callable[[str], None] | None = print,
                      workers: int = 1, shard_mb: float = 64, key: str = "data.paths") -> str:
    """Tokenize the corpus once into a cache of uint32 tokens: bos + document + eos, back to
    back, built in parts of about ``shard_mb`` of source by ``workers`` processes (see
    ``shards.build_cache``: resumable, shared by concurrent builders). Returns the cache
    folder; an existing cache for the same contents is reused."""
    files = source_files(paths, key=key)
    if tokenizer.vocab_size > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError("tokenizer vocab does not fit in uint32")
    cut = functools.partial(safe_cut, tokenizer)
    job = CacheJob(
        cache=cache_path(files, tokenizer, f"{_CACHE_VERSION}:{text_field}", cache_dir,
                         ".tokens"),
        plan=lambda: [part for file in files
                      for part in plan_parts(file, int(shard_mb * 2**20), cut)],
        batches=lambda part: batched(Documents(part, text_field, cut),
                                     lambda piece: len(piece.text), _BATCH_CHARS),
        encode=functools.partial(encode_documents, tokenizer),
        describe=f"tokenizing {key} ({describe_files(files)})")
    return build_cache(job, workers, log)


class Documents(PartReader):
    """(location, document or piece of one) of each text of a part: a .txt file's pieces, or
    each record's ``text_field`` string."""

    def __init__(self, part: Part, text_field: str, cut: CutFinder):
        super().__init__(part, [text_field], cut)
        self.text_field = text_field

    def __iter__(self) -> Iterator[tuple[str, Piece]]:
        field = self.text_field
        for location, item in super().__iter__():
            if isinstance(item, Piece):
                yield location, item
                continue
            text = item.get(field) if isinstance(item, dict) else None
            if not isinstance(text, str):
                got = type(text).__name__ if isinstance(item, dict) and field in item else (
                    f"no {field!r} field")
                raise ValueError(f"{location}: expected a record with a {field!r} string "
                                 f"(data.text_field), got {got}")
            yield location, Piece(text, first=True, last=True)


def encode_documents(tokenizer: Tokenizer, batch: Items) -> dict[str, np.ndarray]:
    """The tokens of a batch of documents (bos + text + eos) and pieces of documents (bos
    only at a document's start, eos only at its end)."""
    pieces = [piece for _, piece in batch]
    if all(piece.first and piece.last for piece in pieces):
        encoded = tokenizer.encode_batch([piece.text for piece in pieces], bos=True, eos=True)
    else:
        encoded = [(tokenizer.encode(piece.text, bos=True) if piece.first
                    else tokenizer.encode_continuation(piece.text))
                   + [tokenizer.eos_id] * piece.last for piece in pieces]
    count = sum(len(ids) for ids in encoded)
    return {"tokens": np.fromiter(itertools.chain.from_iterable(encoded), TOKEN_DTYPE, count)}


class TextRows:
    """Row i of the token stream holds tokens[i*seq_len : (i+1)*seq_len + 1] (input plus the
    shifted target), so documents are packed across rows with their bos/eos separators and
    attend to each other, as in pretraining. ``indices`` keeps only those rows (a split)."""

    def __init__(self, cache: str, seq_len: int, indices: np.ndarray | None = None):
        self.tokens = Stream(cache, "tokens", TOKEN_DTYPE)  # (or a raw uint32 token file)
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
