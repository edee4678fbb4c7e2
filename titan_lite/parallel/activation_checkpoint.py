"""Activation checkpointing per transformer block: full, op-level selective, or every k-th block.

Applied before FSDP, so each block's all-gather (an FSDP hook around the block) stays outside the
recomputed region. The block's ``forward`` is replaced on the instance instead of wrapping the
block in another module, so parameter names (and checkpoint keys) are the same in every mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from titan_lite.config import ActivationCheckpoint
from titan_lite.models.llama3 import Transformer

# Outputs worth keeping: matmuls and attention cost FLOPs to recompute; norms, SiLU, RoPE and
# the residual adds are cheap and are recomputed in backward.
_SAVE_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(torch.ops.aten, _name):
        _SAVE_OPS.add(getattr(torch.ops.aten, _name).default)
# FlexAttention (packed instruction data on CUDA) is a higher-order op, not an aten one. (Its
# eager CPU form has no backward, so only a GPU run exercises this: bench/gpu_check.)
_SAVE_OPS.add(torch.ops.higher_order.flex_attention)


def _save_expensive_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _op_level_contexts() -> Any:
    return create_selective_checkpoint_contexts(_save_expensive_ops)


def _checkpoint_block(block: nn.Module, context_fn: Callable[[], Any] | None) -> None:
    forward = block.forward
    # preserve_rng_state: the recomputation must draw the forward's dropout masks (LoRA
    # dropout), or backward differentiates through other masks than the loss saw.
    options: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": True}
    if context_fn is not None:
        options["context_fn"] = context_fn

    @functools.wraps(forward)
    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, **options, **kwargs)

    block.forward = checkpointed_forward


def checkpoint_every(option: str) -> int | None:
    """``selective_ac_option`` as k (checkpoint every k-th block), or None for "op";
    ValueError naming the key for anything else."""
    if option == "op":
        return None
    if option.isdigit() and int(option) >= 1:
        return int(option)
    raise ValueError(f"activation_checkpoint.selective_ac_option: {option!r} is neither 'op' "
                     "nor a positive integer (checkpoint every k-th block)")


def apply_activation_checkpointing(model: Transformer, cfg: ActivationCheckpoint) -> None:
    """Make the blocks of ``model`` recompute activations in backward as ``cfg`` asks."""
    if cfg.mode == "none":
        return
    every = checkpoint_every(cfg.selective_ac_option)
    for index, block in enumerate(model.layers.values()):
        if cfg.mode == "full":
            _checkpoint_block(block, None)
        elif every is None:
            _checkpoint_block(block, _op_level_contexts)
        elif index % every == 0:
            _checkpoint_block(block, None)
