"""A tensor-memory tracker that labels what each byte is and keeps the breakdown at the peak."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch

from titan_lite.runtime.memory import TensorMemoryTracker, storages

PARAMS, GRADS, OPTIM = "parameters", "gradients", "optimizer states"
BUFFERS, GATHERED, COMM = "buffers", "gathered parameters", "communication buffers"
ACTIVATIONS, BACKWARD, OPTIM_STEP = "activations", "backward temporaries", "optimizer step"
HOST_WEIGHTS, SAVED_ON_HOST = "weights kept on host", "offloaded activations"
LABELS = (PARAMS, HOST_WEIGHTS, GRADS, OPTIM, BUFFERS, GATHERED, COMM, ACTIVATIONS,
          SAVED_ON_HOST, BACKWARD, OPTIM_STEP)
OFFLOADED = (PARAMS, GRADS, OPTIM, OPTIM_STEP)  # host memory under CPU offload
ALWAYS_ON_HOST = (HOST_WEIGHTS, SAVED_ON_HOST)


class LabelledTracker(TensorMemoryTracker):
    """TensorMemoryTracker that labels each storage and keeps the per-label breakdown at the
    device peak and at the host peak (host = the ``host_labels``, e.g. offloaded state, and
    ``ALWAYS_ON_HOST``)."""

    def __init__(self, host_labels: Iterable[str] = ()) -> None:
        super().__init__()
        self.phase = ACTIVATIONS  # the label of storages created outside backward
        self.host_labels = frozenset(host_labels) | frozenset(ALWAYS_ON_HOST)
        self._labels: dict[int, str] = {}
        self.live: Counter[str] = Counter()
        self.device_peak, self.host_peak = 0, 0
        self.device_at_peak: dict[str, int] = {}
        self.host_at_peak: dict[str, int] = {}

    def label(self, tensors: Iterable[torch.Tensor | None], name: str) -> None:
        """Count ``tensors`` (DTensors: their shard) under ``name`` from now on."""
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            for storage in storages(tensor):
                key = storage._cdata
                if key not in self._sizes:
                    self._labels[key] = name
                    self._count(storage)
                elif self._labels[key] != name:
                    size = self._sizes[key]
                    self.live[self._labels[key]] -= size
                    self.live[name] += size
                    self._labels[key] = name
                    self._update_peaks()

    def reset_peak(self) -> None:
        super().reset_peak()
        self.device_peak = self.host_peak = 0
        self._update_peaks()

    def _on_new(self, key: int, origin: Any) -> None:
        if key in self._labels:
            return
        if origin == "resize_":  # FSDP2 re-allocates unsharded parameters by resizing
            self._labels[key] = GATHERED
        elif getattr(origin, "namespace", "") in ("c10d", "_c10d_functional", "fsdp"):
            self._labels[key] = COMM
        elif torch._C._current_graph_task_id() != -1:  # inside autograd's backward pass
            self._labels[key] = BACKWARD  # gradients are relabelled by a hook when assigned
        else:
            self._labels[key] = self.phase

    def _change(self, key: int, delta: int) -> None:
        super()._change(key, delta)
        self.live[self._labels[key]] += delta
        self._update_peaks()

    def _forget(self, key: int, ref: Any) -> None:
        super()._forget(key, ref)
        self._labels.pop(key, None)

    def _update_peaks(self) -> None:
        host = sum(self.live[label] for label in self.host_labels)
        if self.live_bytes - host > self.device_peak:
            self.device_peak = self.live_bytes - host
            self.device_at_peak = {k: v for k, v in self.live.items()
                                   if k not in self.host_labels}
        if host > self.host_peak:
            self.host_peak = host
            self.host_at_peak = {k: self.live[k] for k in self.host_labels}
