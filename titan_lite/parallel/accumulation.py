"""Skipping the gradient reduction on the micro-batches of an accumulation that are not last."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run one micro-batch's forward and backward with gradient reduction on or off.

    Off, DDP keeps its gradients local (``no_sync``) and FSDP skips its reduce-scatter and keeps
    full-size unsharded gradients until a micro-batch with reduction on.
    """
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield
