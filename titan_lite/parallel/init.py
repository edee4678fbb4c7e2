"""Materialise a meta-device model (plain or sharded) with the same weights in every layout."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from functools import partial

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from titan_lite.finetune.nf4 import is_quantized, write_quantized
from titan_lite.models.llama3 import Transformer


@contextlib.contextmanager
def full_tensors(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Show ``module``'s sharded (DTensor) and quantised parameters as full plain tensors
    inside the block, then keep only this rank's shard of what was written to them (quantised).

    Random init of DTensor shards on CPU draws each rank's shard from its own generator, so a
    sharded model would start from other weights than one process with the same seed. Drawing
    the full tensor on every rank and slicing costs one unit's full size transiently (the
    largest is the embedding), never the whole model.
    """
    swapped = []
    for owner in module.modules():
        for name, param in list(owner._parameters.items()):
            if isinstance(param, DTensor) or (param is not None and is_quantized(param)):
                full = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device))
                owner._parameters[name] = full
                swapped.append((owner, name, param, full))
    try:
        yield
    finally:
        for owner, name, param, full in swapped:
            owner._parameters[name] = param
            with torch.no_grad():
                write_shard(param, full.detach())


def write_shard(param: torch.Tensor, full: torch.Tensor) -> None:
    """Store this rank's part of the full values ``full`` in ``param``, a plain, sharded
    (DTensor) or quantised (NF4) parameter."""
    if not isinstance(param, DTensor):
        (write_quantized if is_quantized(param) else torch.Tensor.copy_)(param, full)
        return
    local = param.to_local()
    if is_quantized(local):
        write_quantized(local, full, local_offset(param)[0])
        return
    # src_data_rank=None: every rank holds the same full tensor, so slice locally.
    shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    local.copy_(shard.to_local())


def local_offset(param: DTensor) -> list[int]:
    """Where this rank's shard of ``param`` starts in the full tensor, per dimension."""
    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                      param.placements)
    return list(offset)


def materialize(model: Transformer, seed: int, compute_device: torch.device,
                param_device: torch.device, draw_weights: bool = True) -> None:
    """Allocate the parameters on ``param_device`` (host memory under CPU offload) and the
    buffers on ``compute_device``, then initialise the weights from ``seed`` (unless
    ``draw_weights`` is false: the memory estimator only needs the storage)."""
    # Only modules with tensors still on the meta device: a transform may have created real
    # weights (NF4, a table kept in host memory), which must not be swapped for themselves.
    for module in model.modules():
        own = [*module._parameters.values(), *module._buffers.values()]
        if any(t is not None and t.is_meta for t in own):
            module._apply(lambda t: torch.empty_like(t, device=param_device) if t.is_meta
                          else t, recurse=False)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(compute_device)
    if draw_weights:
        unit_context = partial(full_tensors, device=compute_device)
        model.init_weights(seed, unit_context=unit_context)
        init_added_weights(model, seed, unit_context)


@torch.no_grad()
def init_added_weights(model: nn.Module, seed: int,
                       unit_context: Callable[[nn.Module], ContextManager]) -> None:
    """Initialise the weights a model transform added (modules with ``init_adapter_weights``,
    e.g. LoRA adapters), each from ``seed`` and its module's name as the model's own units are,
    so they too are the same in every layout. The added weights live in the module's children;
    its own parameters (the frozen weight beside the adapters) are left as they are."""
    for name, module in model.named_modules():
        init = getattr(module, "init_adapter_weights", None)
        if init is not None:
            with contextlib.ExitStack() as stack:
                for child in module.children():
                    stack.enter_context(unit_context(child))
                torch.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
                init()
