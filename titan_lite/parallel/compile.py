"""torch.compile per transformer block (training.compile).

Applied after activation checkpointing and before FSDP, as torchtitan orders them: the compiled
region is the block's (possibly checkpointed) forward, and FSDP's all-gather and reduce-scatter
hooks stay outside it, around the block. ``fullgraph``: a graph break is an error instead of a
silent slowdown. The forward is replaced on the instance, so parameter names and
checkpoint keys do not change.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from titan_lite.models.llama3 import Transformer


def apply_compile(model: Transformer) -> None:
    """Compile the forward of every block of ``model`` (a meta-device model or stage)."""
    for block in model.layers.values():
        block.forward = _compiled_forward(block.forward)


def _compiled_forward(eager: Any) -> Any:
    compiled = torch.compile(eager, fullgraph=True)

    @functools.wraps(eager)
    def forward(x: torch.Tensor, rope: torch.Tensor, mask: Any = None, cache: Any = None
                ) -> torch.Tensor:
        if cache is not None:  # generation: shapes change with every token; stays eager
            return eager(x, rope, mask, cache)
        return compiled(x, rope, mask)

    return forward
