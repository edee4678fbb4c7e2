"""A token cache built in parts by any number of builders at once, resumably, in bounded memory.

The cache is a folder: ``part-00000/``, ``part-00001/``, ... each holding raw arrays
(``tokens.uint32``, ...) published by renaming a finished temporary folder, and ``manifest.json``,
written last: a cache is complete when its manifest exists. Builders (every rank of a job, on
one node or on several sharing a filesystem, or ``python -m titan_lite.data prepare``) claim
parts with claim files, so no part is built twice while its builder lives; a part whose builder
died (its process gone, or its claim not refreshed for ``stale_s`` on another host) is built
again. A part's bytes depend only on the data, so two builders racing on one part write the
same bytes and either rename wins. A killed build resumes from its finished parts.

A bad record stops the build: its message is left in ``<cache>.error``, which every builder
raises, and the parts are removed, so no cache is left. Waiting builders poll files, never a
collective, so a long build cannot time out the job's process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from titan_lite.data.sources import Part, PartReader

_HOST = socket.gethostname()
_STARTED = time.time()  # an error file older than this process is a past run's
_POLL_S = 0.5
_PROGRESS_EVERY_S = 5.0
_MAX_OPEN_PARTS = 64  # memory maps kept open per array (each holds a file descriptor)
Arrays = dict[str, np.ndarray]
Items = list[tuple[str, Any]]  # (location, item) pairs


@dataclass
class CacheJob:
    """What to build: ``plan`` cuts the sources into parts (run once, by the first builder);
    ``batches`` reads a part's items in batches (each with how much of the part is read, for
    progress); ``encode`` turns a batch into arrays (in a worker process when there are
    several); ``describe`` names the data in the log."""
    cache: str
    plan: Callable[[], list[Part]]
    batches: Callable[[Part], Iterator[tuple[Items, int]]]
    encode: Callable[[Items], Arrays]
    describe: str


def build_cache(job: CacheJob, workers: int = 1, log: Callable[[str], None] | None = print,
                stale_s: float = 120.0) -> str:
    """Build ``job.cache`` (or wait for the builders already at it) and return it; ``workers``
    processes encode, ``log`` (None: silent) gets progress with an ETA."""
    if os.path.exists(_manifest(job.cache)):
        return job.cache
    _clear_stale_error(job.cache)
    try:
        os.makedirs(job.cache, exist_ok=True)
        parts = _plan(job)
        with _Encoder(job.encode, workers) as encoder:
            builder = _Builder(job, parts, encoder, log, stale_s)
            builder.run()
    except ValueError as e:
        fail(job.cache, str(e))
        raise
    except OSError:
        _raise_recorded_error(job.cache)  # another builder failed and removed the parts
        raise
    return job.cache


def _manifest(cache: str) -> str:
    return os.path.join(cache, "manifest.json")


def read_manifest(cache: str) -> dict:
    with open(_manifest(cache)) as fh:
        return json.load(fh)


# --- errors ----------------------------------------------------------------------------------

def _error_file(cache: str) -> str:
    return f"{cache}.error"


def _clear_stale_error(cache: str) -> None:
    try:
        if os.path.getmtime(_error_file(cache)) < _STARTED:
            os.remove(_error_file(cache))
    except FileNotFoundError:
        pass


def _raise_recorded_error(cache: str) -> None:
    try:
        with open(_error_file(cache)) as fh:
            message = fh.read()
    except FileNotFoundError:
        return
    raise ValueError(message)


def fail(cache: str, message: str) -> None:
    """Record ``message`` for the other builders and leave no cache behind."""
    if not os.path.exists(_error_file(cache)):
        _write_atomic(_error_file(cache), message)
    shutil.rmtree(cache, ignore_errors=True)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{_HOST}-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# --- the plan: the same parts for every builder ----------------------------------------------

def _plan(job: CacheJob) -> list[Part]:
    """The parts, as the first builder planned them (stored in plan.json)."""
    path = os.path.join(job.cache, "plan.json")
    if not os.path.exists(path):
        tmp = f"{path}.tmp-{_HOST}-{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump([dataclasses.asdict(part) for part in job.plan()], fh)
        try:
            os.link(tmp, path)  # atomic, and fails when another builder's plan is there
        except FileExistsError:
            pass
        finally:
            os.remove(tmp)
    with open(path) as fh:
        return [Part(**part) for part in json.load(fh)]


# --- encoding on worker processes ------------------------------------------------------------

_worker_encode: Callable[[Items], Arrays] | None = None


def _start_worker(encode: Callable[[Items], Arrays]) -> None:
    global _worker_encode
    _worker_encode = encode
    # one thread per worker: the workers are the parallelism (see tokenizer.encode_threads)
    os.environ["TITAN_LITE_ENCODE_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _run_worker(batch: Items) -> Arrays:
    assert _worker_encode is not None
    return _worker_encode(batch)


class _Encoder:
    """Batches in, arrays out in the same order: in this process, or on ``workers`` forked
    processes with a bounded number of batches in flight (memory stays bounded)."""

    def __init__(self, encode: Callable[[Items], Arrays], workers: int):
        self.encode, self.workers = encode, workers
        self.pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Encoder:
        if self.workers > 1:
            import multiprocessing

            # fork: the workers inherit the tokenizer and template instead of pickling them
            self.pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("fork"),
                                            initializer=_start_worker,
                                            initargs=(self.encode,))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def map(self, batches: Iterator[tuple[Items, int]]) -> Iterator[tuple[Arrays, int]]:
        if self.pool is None:
            for batch, chars in batches:
                yield self.encode(batch), chars
            return
        window: deque = deque()
        for batch, chars in batches:
            window.append((self.pool.submit(_run_worker, batch), chars))
            if len(window) > 2 * self.workers:
                future, done = window.popleft()
                yield future.result(), done
        while window:
            future, done = window.popleft()
            yield future.result(), done


# --- the builder -----------------------------------------------------------------------------

class _Builder:
    def __init__(self, job: CacheJob, parts: list[Part], encoder: _Encoder,
                 log: Callable[[str], None] | None, stale_s: float):
        self.job, self.parts, self.encoder, self.log, self.stale_s = (job, parts, encoder, log,
                                                                      stale_s)
        self.total = sum(part.size for part in parts) or 1
        self.started, self.last_report = time.monotonic(), time.monotonic()
        self.done_at_start = None  # bytes already built when this builder started (rate)

    def path(self, index: int, suffix: str = "") -> str:
        return os.path.join(self.job.cache, f"part-{index:05d}{suffix}")

    def finished(self) -> list[bool]:
        return [os.path.isdir(self.path(i)) for i in range(len(self.parts))]

    def run(self) -> None:
        while not os.path.exists(_manifest(self.job.cache)):
            _raise_recorded_error(self.job.cache)
            missing = [i for i, done in enumerate(self.finished()) if not done]
            if not missing:
                self.publish()
                break
            index = next((i for i in missing if self.claim(i)), None)
            if index is None:  # every missing part is another builder's: wait on the files
                self.report(0)
                time.sleep(_POLL_S)
                continue
            self.build(index)
        if self.log is not None:
            self.log(f"{self.job.describe}: {self.summary()} -> {self.job.cache}")

    def claim(self, index: int) -> bool:
        """Whether this builder may build part ``index`` (its claim file made, or taken over
        from a builder that died, whose unfinished folder goes)."""
        claim = self.path(index, ".claim")
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _owner(claim)
            if owner is not None and self.alive(*owner):
                return False
            if owner is not None:
                shutil.rmtree(self.path(index, f".tmp-{owner[0]}-{owner[1]}"),
                              ignore_errors=True)
            _write_atomic(claim, f"{_HOST} {os.getpid()}")
            return True
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{_HOST} {os.getpid()}")
        return True

    def alive(self, host: str, pid: int, age: float) -> bool:
        """Whether a claim's builder lives: on this host the process says; on another, its
        claim was refreshed within ``stale_s``."""
        if host != _HOST:
            return age < self.stale_s
        if pid == os.getpid():  # (a claim of this process left by an interrupted build)
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            pass
        return True

    def build(self, index: int) -> None:
        """Encode part ``index`` into a temporary folder, then publish it by renaming."""
        claim = self.path(index, ".claim")
        tmp = self.path(index, f".tmp-{_HOST}-{os.getpid()}")
        try:
            self.write(self.parts[index], tmp, claim)
            os.rename(tmp, self.path(index))
        except OSError:  # a racing builder published this part (the same bytes) and tidied
            if not os.path.isdir(self.path(index)):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove(claim)

    def write(self, part: Part, tmp: str, claim: str) -> None:
        os.makedirs(tmp, exist_ok=True)
        with contextlib.ExitStack() as stack:
            files: dict[str, IO[bytes]] = {}
            for arrays, done in self.encoder.map(self.job.batches(part)):
                for name, array in arrays.items():
                    if name not in files:
                        path = os.path.join(tmp, _file_name(name, array))
                        files[name] = stack.enter_context(open(path, "wb"))
                    array.tofile(files[name])
                _touch(claim)  # still alive
                self.report(min(done, part.size))

    def publish(self) -> None:
        """All parts are there: write the manifest (the same one, whoever writes it)."""
        parts = []
        for index in range(len(self.parts)):
            folder = self.path(index)
            arrays = {}
            for name in sorted(os.listdir(folder)):
                array, dtype = name.rsplit(".", 1)
                size = os.path.getsize(os.path.join(folder, name))
                arrays[array] = {"file": name, "count": size // np.dtype(dtype).itemsize}
            parts.append({"folder": os.path.basename(folder), "arrays": arrays})
        counts: dict[str, int] = {}
        for part in parts:
            for name, array in part["arrays"].items():
                counts[name] = counts.get(name, 0) + array["count"]
        _write_atomic(_manifest(self.job.cache), json.dumps(
            {"describe": self.job.describe, "counts": counts, "parts": parts}, indent=1))
        for name in os.listdir(self.job.cache):  # what builders that died left
            path = os.path.join(self.job.cache, name)
            if ".tmp-" in name and os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif ".tmp-" in name or name.endswith(".claim"):
                _remove(path)

    def report(self, own: int) -> None:
        """Progress with an ETA every few seconds (the parts of every builder count)."""
        now = time.monotonic()
        if self.log is None or now - self.last_report < _PROGRESS_EVERY_S:
            return
        self.last_report = now
        finished = self.finished()
        done = own + sum(p.size for p, f in zip(self.parts, finished) if f)
        if self.done_at_start is None:
            self.done_at_start = done
        rate = (done - self.done_at_start) / max(now - self.started, 1e-9)
        eta = f", ETA {_duration((self.total - done) / rate)}" if rate > 0 else ""
        self.log(f"{self.job.describe}: {100 * done / self.total:.0f}% ({sum(finished)}/"
                 f"{len(self.parts)} parts, {done / 2**20:,.0f} of {self.total / 2**20:,.0f} "
                 f"MiB, {rate / 2**20:.1f} MiB/s{eta})")

    def summary(self) -> str:
        counts = read_manifest(self.job.cache)["counts"]
        elapsed = time.monotonic() - self.started
        return (f"{counts.get('tokens', 0):,} tokens in {len(self.parts)} part(s), "
                f"{self.total / 2**20:,.1f} MiB in {_duration(elapsed)}")


def _file_name(name: str, array: np.ndarray) -> str:
    return f"{name}.{array.dtype.name}"  # tokens.uint32


def _owner(claim: str) -> tuple[str, int, float] | None:
    """(host, pid, seconds since refreshed) of a claim's builder; None if unreadable."""
    try:
        with open(claim) as fh:
            host, pid = fh.read().split()
        return host, int(pid), time.time() - os.path.getmtime(claim)
    except (FileNotFoundError, ValueError):
        return None


def _touch(path: str) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def batched(reader: PartReader, weigh: Callable[[Any], int], limit: int
            ) -> Iterator[tuple[Items, int]]:
    """The items of ``reader`` in batches of up to ``limit`` by ``weigh``, each with how much
    of the part is read after it (``PartReader.done``)."""
    batch: Items = []
    weight = 0
    for location, item in reader:
        batch.append((location, item))
        weight += weigh(item)
        if weight >= limit:
            yield batch, reader.done
            batch, weight = [], 0
    if batch:
        yield batch, reader.part.size


# --- reading a cache -------------------------------------------------------------------------

class Stream:
    """Array ``name`` of a cache, its parts back to back, read through memory maps without
    loading it; also a single raw file of ``dtype`` (a token file written by hand)."""

    def __init__(self, cache: str, name: str, dtype: Any):
        self.dtype = np.dtype(dtype)
        if os.path.isdir(cache):
            parts = read_manifest(cache)["parts"]
            found = [(os.path.join(cache, p["folder"], p["arrays"][name]["file"]),
                      p["arrays"][name]["count"]) for p in parts if name in p["arrays"]]
        else:
            found = [(cache, os.path.getsize(cache) // self.dtype.itemsize)]
        found = [(file, count) for file, count in found if count > 0]
        self.files = [file for file, _ in found]
        self.ends = np.cumsum([count for _, count in found], dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _map(self, index: int) -> np.ndarray:
        if index not in self._maps:
            if len(self._maps) >= _MAX_OPEN_PARTS:
                self._maps.clear()
            self._maps[index] = np.memmap(self.files[index], dtype=self.dtype, mode="r")
        return self._maps[index]

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, _ = index.indices(len(self))
        pieces = []
        while start < stop:
            part = int(np.searchsorted(self.ends, start, side="right"))
            first = int(self.ends[part - 1]) if part else 0
            end = min(stop, int(self.ends[part]))
            pieces.append(self._map(part)[start - first:end - first])
            start = end
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=self.dtype)

    def read(self) -> np.ndarray:
        """The whole array in memory (small arrays: sample lengths)."""
        return self[0:len(self)].copy() if len(self) else np.zeros(0, dtype=self.dtype)
