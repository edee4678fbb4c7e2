"""Replicated data parallel (DDP) over the mesh's ``dp_replicate`` dim."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Wrap ``model`` so gradients are averaged over ``dp_replicate``; returns the wrapper.

    DDP broadcasts rank 0's parameters at construction, so every replica starts identical.
    """
    group = mesh["dp_replicate"].get_group()
    device_ids = None if mesh.device_type == "cpu" else [next(model.parameters()).device]
    return DistributedDataParallel(model, process_group=group, device_ids=device_ids)
