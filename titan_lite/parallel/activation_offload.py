"""Activation offloading: the tensors autograd saves in forward move to host memory and come
back in backward (``activation_checkpoint.offload``).

Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) see every tensor the forward
saves for backward outside checkpointed regions: with full AC that is each block's input (what
the recomputation starts from), ~1 GiB for an 8B at 2 x 2048 tokens. The copies go into pinned
host memory, asynchronously on the compute stream (the stream orders them with the kernels
that free or reuse the memory, and PyTorch's pinned-memory cache keeps a host buffer until its
copy is done); about 1 GiB each way per step is some tens of milliseconds over PCIe next to a
step of seconds. Parameters, the model's buffers (the RoPE table) and small tensors stay where
they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

MIN_BYTES = 2**20  # smaller saved tensors are not worth a copy each way


class OffloadSavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Within it, what autograd saves goes to host memory (see the module docstring).

    ``model``: its parameters and buffers stay put. ``on_offload(host_copy)``: called for each
    copy (the memory estimator labels them host memory)."""

    def __init__(self, model: nn.Module,
                 on_offload: Callable[[torch.Tensor], None] | None = None) -> None:
        buffers = {b.untyped_storage()._cdata for b in model.buffers()}
        pin = torch.cuda.is_available()

        def pack(tensor: torch.Tensor) -> Any:
            # parameters (also FSDP's gathered ones), DTensors and quantised weights stay
            if (isinstance(tensor, nn.Parameter) or is_traceable_wrapper_subclass(tensor)
                    or tensor.untyped_storage()._cdata in buffers
                    or tensor.numel() * tensor.element_size() < MIN_BYTES):
                return tensor
            host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=pin)
            host.copy_(tensor, non_blocking=True)
            if on_offload is not None:
                on_offload(host)
            return tensor.device, host

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=True)

        super().__init__(pack, unpack)
