"""The frozen base of a fine-tuning run: what identifies it, and what it holds."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial

from titan_lite.runtime.distributed import local_shard
from titan_lite.finetune.lora import base_parameters
from titan_lite.finetune.nf4 import dequantized, is_quantized
from titan_lite.runtime.memory import tensor_bytes


@torch.no_grad()
def base_fingerprint(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Per base weight, float64 (sum, sum of squares) over the whole tensor, whatever its
    sharding: a resume compares them with the checkpoint's to know it holds the same base."""
    prints = {}
    for part in parts:
        for name, param in base_parameters(part):
            local = dequantized(local_shard(param))
            sums = torch.zeros(2, dtype=torch.float64, device=local.device)
            for chunk in local.detach().flatten().split(2**24):  # bounded float64 temporaries
                chunk = chunk.double()
                sums += torch.stack([chunk.sum(), chunk.square().sum()])
            if isinstance(param, DTensor):  # add up the shards (not the replicas) of HSDP
                placements = [Partial() if p.is_shard() else p for p in param.placements]
                sums = DTensor.from_local(sums, param.device_mesh, placements).full_tensor()
            prints[name] = sums.cpu()
    return prints


def describe_parameters(model: nn.Module, held: Iterable[nn.Module] | nn.Module) -> str:
    """One start-up line on what is trained: counts over the whole ``model`` (e.g. its meta
    copy), bytes and dtypes of what this rank holds (``held``: its materialised parts)."""
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    local = list(held.parameters()) if isinstance(held, nn.Module) else [
        p for part in held for p in part.parameters()]
    trained_bytes = sum(tensor_bytes(p) for p in local if p.requires_grad)
    trained_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in local
                             if p.requires_grad})
    line = (f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%),"
            f" {trained_bytes / 2**20:,.1f} MiB on this rank in {'/'.join(trained_dtypes)}")
    frozen = [p for p in local if not p.requires_grad]
    if not frozen:
        return line
    frozen_dtypes = sorted({"nf4" if is_quantized(p) else str(p.dtype).removeprefix("torch.")
                            for p in frozen})
    return (f"{line} | frozen base: {total - trainable:,} parameters, "
            f"{sum(map(tensor_bytes, frozen)) / 2**20:,.1f} MiB on this rank in "
            f"{'/'.join(frozen_dtypes)}")
