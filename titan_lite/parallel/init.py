"""Materialise a meta-device model (plain or sharded) with the same weights in every layout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from titan_lite.models.llama3 import Transformer


@contextlib.contextmanager
def full_tensors(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Show ``module``'s sharded (DTensor) parameters as full plain tensors inside the block,
    then keep only this rank's shard of what was written to them.

    Random init of DTensor shards on CPU draws each rank's shard from its own generator, so a
    sharded model would start from other weights than one process with the same seed. Drawing
    the full tensor on every rank and slicing costs one unit's full size transiently (the
    largest is the embedding), never the whole model.
    """
    swapped = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                full = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device))
                owner._parameters[name] = full
                swapped.append((owner, name, param, full))
    try:
        yield
    finally:
        for owner, name, param, full in swapped:
            owner._parameters[name] = param
            # src_data_rank=None: every rank holds the same full tensor, so slice locally.
            shard = distribute_tensor(full.detach(), param.device_mesh, param.placements,
                                      src_data_rank=None)
            with torch.no_grad():
                param.to_local().copy_(shard.to_local())


def materialize(model: Transformer, seed: int, compute_device: torch.device,
                param_device: torch.device, draw_weights: bool = True) -> None:
    """Allocate the parameters on ``param_device`` (host memory under CPU offload) and the
    buffers on ``compute_device``, then initialise the weights from ``seed`` (unless
    ``draw_weights`` is false: the memory estimator only needs the storage)."""
    model.to_empty(device=param_device)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(compute_device)
    if draw_weights:
        model.init_weights(seed, unit_context=partial(full_tensors, device=compute_device))
