"""Peak memory that means something on CPU too: the bytes of live tensors, tracked per storage.

CUDA has an allocator that counts (``torch.cuda.max_memory_allocated``). On CPU the resident set
size mixes in the Python heap, libraries and allocator caches, so it cannot show what activation
checkpointing or sharding saves. ``TensorMemoryTracker`` is a dispatch mode that sees every tensor
an op creates, counts each storage once, and subtracts it when the storage is freed.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    is_traceable_wrapper_subclass,
    is_traceable_wrapper_subclass_type,
)
from torch.utils._pytree import tree_leaves

from titan_lite.runtime.distributed import local_shard


def storages(tensor: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages holding a tensor's data on this rank: a DTensor's shard's, or a wrapper
    subclass's inner tensors' (e.g. an NF4 weight's 4-bit codes and its scales)."""
    tensor = local_shard(tensor)
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [s for name in names for s in storages(getattr(tensor, name))]
    return [tensor.untyped_storage()]


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes this rank holds for ``tensor`` (see ``storages``)."""
    return sum(storage.nbytes() for storage in storages(tensor))


class TensorMemoryTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created under it or registered with ``track``.

    Use as a context manager around the work to measure (e.g. each training step); tensors that
    exist before (parameters, optimizer states) are registered with ``track``. Storage resizes
    (FSDP2 frees and re-allocates gathered parameters that way) are followed while active.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}  # storage address key -> bytes counted
        self._refs: dict[int, weakref.ref] = {}
        self._original_resize = torch.UntypedStorage.resize_
        self._fake_mode: FakeTensorMode | None = None
        # storages may be freed on another thread (the optimizer step in backward's worker)
        self._lock = threading.RLock()

    def track(self, tensors: Iterable[Any]) -> None:
        """Count tensors created outside the tracker (DTensors count their local shard)."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                for storage in storages(tensor):
                    self._count(storage)

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _count(self, storage: torch.UntypedStorage, origin: Any = None) -> None:
        """Count a new storage, or a size change; ``origin`` is the op that produced it (or
        "resize_"), for subclasses that label storages."""
        key = storage._cdata
        with self._lock:
            previous = self._sizes.get(key)
            size = storage.nbytes()
            if previous == size:
                return
            if previous is None:
                self._refs[key] = weakref.ref(storage, functools.partial(self._forget, key))
                self._on_new(key, origin)
            self._sizes[key] = size
            self._change(key, size - (previous or 0))

    def _on_new(self, key: int, origin: Any) -> None:
        """Hook: a storage is counted for the first time."""

    def _change(self, key: int, delta: int) -> None:
        self.live_bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def _forget(self, key: int, _ref: weakref.ref) -> None:
        with self._lock:
            self._refs.pop(key, None)
            if key in self._sizes:
                self._change(key, -self._sizes.pop(key))

    def __enter__(self) -> TensorMemoryTracker:
        tracker, original = self, self._original_resize

        def resize_(storage: torch.UntypedStorage, size: int) -> Any:
            result = original(storage, size)
            if storage._cdata in tracker._sizes or size > 0:
                tracker._count(storage, "resize_")
            return result

        torch.UntypedStorage.resize_ = resize_  # resize_ bypasses the dispatcher
        self._fake_mode = active_fake_mode()  # set when estimating under FakeTensorMode
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._original_resize
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if any(map(is_traceable_wrapper_subclass_type, types)):
            return NotImplemented  # let DTensor (NF4, ...) unwrap; its inner ops come back here
        if func is torch.ops._c10d_functional.wait_tensor.default and self._fake_mode:
            return args[0]  # its fake kernel returns a new tensor; the real op waits in place
        out = func(*args, **(kwargs or {}))
        if active_fake_mode() is not self._fake_mode:
            return out  # DTensor's sharding propagation runs ops on fake copies: not memory
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._count(leaf.untyped_storage(), func)
        return out
