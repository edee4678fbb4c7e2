"""FSDP2: ``fully_shard`` each transformer block, then the root (embeddings, norm, output)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from titan_lite.config import Parallelism, Training
from titan_lite.runtime.distributed import DTYPES
from titan_lite.models.llama3 import Transformer
from titan_lite.parallel.dims import data_parallel_mesh


def apply_fsdp(model: Transformer, mesh: DeviceMesh, training: Training,
               parallelism: Parallelism, pipelined: bool = False,
               ignored_params: set[torch.nn.Parameter] | None = None) -> None:
    """Shard ``model`` in place over the data-parallel dims of ``mesh`` (HSDP when replicated).

    Call it on the meta device, after activation checkpointing: each block becomes one
    all-gather / reduce-scatter unit, and the optimizer must be built on the resulting DTensors.
    ``pipelined``: ``model`` is a pipeline stage. ``ignored_params``: left as they are (not
    sharded nor moved), e.g. frozen weights kept in host memory.
    """
    param_dtype = DTYPES[training.mixed_precision_param]
    mp_policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype,
        reduce_dtype=DTYPES[training.mixed_precision_reduce])
    offload_policy = OffloadPolicy()
    if training.enable_cpu_offload:
        # Pinned host memory makes the copies to and from the GPU asynchronous; pinning needs
        # an accelerator, so a CPU-only run keeps pageable memory.
        offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    dp_mesh = data_parallel_mesh(mesh)
    policy = parallelism.fsdp_reshard_after_forward
    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The last block's backward starts right after the forward: resharding it would only
        # buy an immediate second all-gather. A pipeline stage runs several micro-batches'
        # forwards before their backwards, so by default it keeps its blocks gathered.
        reshard = policy == "always" or (policy == "default" and not pipelined
                                         and index < len(blocks) - 1)
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                    reshard_after_forward=reshard, ignored_params=ignored_params)
    # None lets FSDP keep the root's parameters gathered after forward (needed first in backward).
    root_reshard = {"default": None, "always": True, "never": False}[policy]
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, offload_policy=offload_policy,
                reshard_after_forward=root_reshard, ignored_params=ignored_params)
