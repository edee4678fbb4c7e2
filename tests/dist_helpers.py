"""Run a function on N gloo ranks under pytest, failing fast instead of hanging.

The ranks are processes kept for the whole session, one set per world size (as torch's own
``MultiProcContinuousTest`` does): starting two Python processes that import torch and
titan_lite costs ~3-4 s on this 2-core machine, more than most of the layouts they run. Each
call gets a fresh process group (a new port) and what a spawned process would have: the
caller's environment and working directory, the same seed, one thread, dynamo's caches empty.
A call that fails on any rank ends that set of processes; the next call starts a new one.
``fresh=True`` runs on new processes, for what is read once at import.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT = timedelta(seconds=60)
CALL_TIMEOUT_S = 600  # a call's ranks all answer within this, or the call fails


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_one(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=GLOO_TIMEOUT)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(rank: int, world_size: int, tasks, answers) -> None:
    """A rank's loop: run each call as a spawned process would, answer None or the traceback."""
    seed = torch.initial_seed()
    while (task := tasks.get()) is not None:
        environ, cwd, port, fn, args = task
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        torch.manual_seed(seed)
        try:
            _run_one(rank, world_size, port, fn, args)
            answer = None
        except BaseException:  # SystemExit too: reported, not swallowed
            answer = traceback.format_exc()
        torch._dynamo.reset()
        answers.put((rank, answer))
    # A normal interpreter exit after a device mesh sometimes aborts in C++ destructors
    # ("terminate called without an active exception"): skip them, as the trainer does.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Ranks:
    def __init__(self, world_size: int):
        context = mp.get_context("spawn")
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.answers = context.Queue()
        self.processes = [context.Process(target=_serve, daemon=True,
                                          args=(rank, world_size, self.tasks[rank], self.answers))
                          for rank in range(world_size)]
        for process in self.processes:
            process.start()

    def call(self, fn, args) -> list[str]:
        """Run ``fn`` on every rank; the failures' tracebacks (empty: all passed)."""
        task = (dict(os.environ), os.getcwd(), _free_port(), fn, args)
        for tasks in self.tasks:
            tasks.put(task)
        failures, waiting = [], set(range(len(self.processes)))
        for _ in range(CALL_TIMEOUT_S):
            try:
                rank, answer = self.answers.get(timeout=1)
            except queue.Empty:
                dead = [r for r in waiting if not self.processes[r].is_alive()]
                if dead:
                    codes = {r: self.processes[r].exitcode for r in dead}
                    return failures + [f"rank(s) {dead} exited with {codes}"]
                continue
            waiting.discard(rank)
            if answer is not None:
                failures.append(f"rank {rank}:\n{answer}")
            if not waiting:
                return failures
        return failures + [f"ranks {sorted(waiting)} did not answer in {CALL_TIMEOUT_S} s"]

    def close(self) -> None:
        for tasks, process in zip(self.tasks, self.processes):
            if process.is_alive():
                tasks.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


_RANKS: dict[int, _Ranks] = {}


def run_distributed(fn, world_size: int, *args, fresh: bool = False) -> None:
    """Call ``fn(rank, world_size, *args)`` on every rank; an exception on any rank fails.
    ``fresh``: on new processes, closed afterwards (for what is read once, at import)."""
    if fresh:
        ranks = _Ranks(world_size)
        failures = ranks.call(fn, args)
        ranks.close()
    else:
        if world_size not in _RANKS:
            _RANKS[world_size] = _Ranks(world_size)
        failures = _RANKS[world_size].call(fn, args)
        if failures:  # the other ranks may be left in any state: start afresh next time
            _RANKS.pop(world_size).close()
    if failures:
        raise AssertionError("\n".join(failures))


@atexit.register
def _close_all() -> None:
    for ranks in _RANKS.values():
        ranks.close()
