"""Replicated data parallel (DDP) over the mesh's ``dp_replicate`` dim."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, mesh: DeviceMesh, ignored: Sequence[str] = ()) -> nn.Module:
    """Wrap ``model`` so gradients are averaged over ``dp_replicate``; returns the wrapper.

    DDP broadcasts rank 0's parameters at construction, so every replica starts identical.
    ``ignored``: names of parameters DDP leaves alone (frozen weights kept in host memory).
    """
    group = mesh["dp_replicate"].get_group()
    if ignored:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    device_ids = None if mesh.device_type == "cpu" else [
        next(p for n, p in model.named_parameters() if n not in ignored).device]
    return DistributedDataParallel(model, process_group=group, device_ids=device_ids)
