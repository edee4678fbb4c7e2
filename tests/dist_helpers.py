"""Run a function on N gloo ranks under pytest (mp.spawn), failing fast instead of hanging."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from titan_lite.runtime.distributed import shutdown_and_exit

GLOO_TIMEOUT = timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=GLOO_TIMEOUT)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        dist.destroy_process_group()
        raise  # mp.spawn reports it
    # A normal interpreter exit after a device mesh sometimes aborts in C++ destructors
    # ("terminate called without an active exception"); leave the way the trainer does.
    shutdown_and_exit(0)


def run_distributed(fn, world_size: int, *args) -> None:
    """Call ``fn(rank, world_size, *args)`` on every rank; an exception on any rank fails."""
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
