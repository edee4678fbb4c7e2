"""Activation offloading: the tensors autograd saves in forward move to host memory and come
back in backward (``activation_checkpoint.offload``).

Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) see every tensor the forward
saves for backward outside checkpointed regions: with full AC that is each block's input (what
the recomputation starts from), ~1 GiB for an 8B at 2 x 2048 tokens. What moves is activations
only, each once: weights stay where they are however autograd saves them (the parameter, a view
such as the ``weight.t()`` that ``F.linear`` saves, or autocast's cached low-precision copy),
so do the model's buffers and views of them (the RoPE table), small tensors and tensor
subclasses; a tensor saved by several ops (the packed samples' RoPE rows and mask, which every
block saves) is copied once. On CUDA the copies run on a side stream, so the forward and
backward kernels do not wait for them: host copies start once the compute stream has produced
the tensor (``wait_stream``) and the caching allocator keeps the device memory until the copy
is done (``record_stream``); in backward, bringing a tensor back also starts bringing back the
one saved before it, so the next block's input arrives while this block recomputes. Torchtune's
activation-offloading hooks are the model for this.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

MIN_BYTES = 2**20  # smaller saved tensors are not worth a copy each way


def is_weight(tensor: torch.Tensor) -> bool:
    """A parameter, autocast's cast of one (a copy whose autograd parent is the parameter
    itself), or a view of either (``F.linear`` saves ``weight.t()``)."""
    if tensor._base is not None:
        tensor = tensor._base
    if isinstance(tensor, nn.Parameter):
        return True
    node = tensor.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    return any(isinstance(getattr(parent, "variable", None), nn.Parameter)
               for parent, _ in node.next_functions if parent is not None)


class _Offloaded:
    """A saved tensor's host copy, and its copy back on the device while one is in use."""

    def __init__(self, host: torch.Tensor, device: torch.device,
                 previous: _Offloaded | None) -> None:
        self.host, self.device, self.previous = host, device, previous
        self.fetched: torch.Tensor | None = None  # copied back, not yet taken (a prefetch)
        self.in_use: weakref.ref | None = None  # taken: alive while backward holds it
        self.ready: torch.cuda.Event | None = None  # the copy back is done (CUDA)

    def fetch(self) -> None:
        """Start copying back to the device, unless a copy is there already."""
        if self.fetched is not None or (self.in_use is not None and self.in_use() is not None):
            return
        stream = _copy_stream(self.device, self.host)
        if stream is None:
            self.fetched = self.host.to(self.device)
            return
        with torch.cuda.stream(stream):
            self.fetched = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> torch.Tensor:
        """The data back on the device, usable by the compute stream. Only backward holds it
        then (this keeps a weak reference), so it is freed as soon as backward is done with
        it; taken again later, it is copied back again."""
        self.fetch()
        tensor = self.fetched if self.fetched is not None else self.in_use()
        self.fetched, self.in_use = None, weakref.ref(tensor)
        if self.previous is not None:  # backward goes on with what was saved before this
            self.previous.fetch()
            self.previous = None
        if self.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.ready)
            tensor.record_stream(current)  # its memory outlives the compute's use
        return tensor


class _Saved:
    """One saved tensor: a shape over a (shared) offloaded copy of its data."""

    def __init__(self, data: _Offloaded, shape: torch.Size) -> None:
        self.data, self.shape = data, shape

    def take(self) -> torch.Tensor:
        return self.data.take().view(self.shape)


def _data_key(tensor: torch.Tensor) -> tuple:
    """What identifies a saved tensor's data: contiguous views of the same elements (a linear
    saves ``x.view(-1, dim)`` where a norm saved ``x``) share it."""
    layout = ("contiguous",) if tensor.is_contiguous() else (tuple(tensor.shape),
                                                              tensor.stride())
    return (tensor.untyped_storage()._cdata, tensor.storage_offset(), tensor.numel(),
            tensor.dtype, tensor._version, *layout)


class OffloadSavedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Within it, what autograd saves goes to host memory (see the module docstring).

    ``model``: its buffers (and views of them) stay put. ``on_offload(host_copy)``: called for
    each copy (the memory estimator labels them host memory; tests count the bytes)."""

    def __init__(self, model: nn.Module,
                 on_offload: Callable[[torch.Tensor], None] | None = None) -> None:
        buffers = {b.untyped_storage()._cdata for b in model.buffers()}
        # saved data -> its copy while its storage lives (a freed one's memory may be reused)
        copies: dict[tuple, tuple[StorageWeakRef, _Offloaded]] = {}
        last: list[_Offloaded | None] = [None]  # the copy made before, for the prefetch

        def pack(tensor: torch.Tensor) -> Any:
            if (is_traceable_wrapper_subclass(tensor) or is_weight(tensor)
                    or tensor.numel() * tensor.element_size() < MIN_BYTES
                    or tensor.untyped_storage()._cdata in buffers):
                return tensor
            key = _data_key(tensor)
            if key in copies and not copies[key][0].expired():
                return _Saved(copies[key][1], tensor.shape)
            offloaded = _Offloaded(_to_host(tensor), tensor.device, last[0])
            copies[key] = (StorageWeakRef(tensor.untyped_storage()), offloaded)
            last[0] = offloaded
            if on_offload is not None:
                on_offload(offloaded.host)
            return _Saved(offloaded, tensor.shape)

        def unpack(packed: Any) -> torch.Tensor:
            return packed if isinstance(packed, torch.Tensor) else packed.take()

        super().__init__(pack, unpack)


_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device, tensor: torch.Tensor) -> torch.cuda.Stream | None:
    """The side stream copies to and from ``device`` run on; None off CUDA (and for the
    estimator's fake tensors), where copies are synchronous."""
    if device.type != "cuda" or is_fake(tensor):
        return None
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    stream = _copy_stream(tensor.device, tensor)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu",
                       pin_memory=stream is not None)
    if stream is None:
        host.copy_(tensor)
        return host
    stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is computed
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(stream)  # its memory is not reused before the copy is done
    return host
