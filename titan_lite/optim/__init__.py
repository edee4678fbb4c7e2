"""AdamW with weight-decay groups, and the warmup + decay learning-rate schedule; ``compact``
keeps AdamW's moments in bfloat16 or int8, ``in_backward`` steps each FSDP unit on the host as
backward reaches it."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from titan_lite.config import LRScheduler, Optimizer
from titan_lite.optim.compact import STATE_DTYPES, SlicedAdamW, state_bytes_per_parameter
from titan_lite.optim.in_backward import StepInBackward, fsdp_units


def build_optimizer(model: nn.Module, cfg: Optimizer,
                    loss_scale: Callable[[], float] = lambda: 1.0,
                    synchronous: bool = False) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norm weights) do not. Moments in
    ``cfg.state_dtype``; with ``cfg.in_backward`` one AdamW per FSDP unit, stepped in backward
    (``loss_scale``: float16's current scale, which those steps divide the gradients by;
    ``synchronous``: on the training thread, see StepInBackward)."""
    if cfg.in_backward:
        return StepInBackward(fsdp_units(model),
                              lambda groups: _adamw(groups, cfg), lambda p: _groups(p, cfg),
                              loss_scale, synchronous)
    return _adamw(_groups([p for p in model.parameters() if p.requires_grad], cfg), cfg)


def trained_bytes_per_param(cfg: Optimizer) -> float:
    """Bytes a trained parameter costs beside its activations: its float32 weight, its float32
    gradient (none with the step in backward: a unit's gradients live only until it steps)
    and AdamW's two moments in ``cfg.state_dtype``."""
    return 4 + (0 if cfg.in_backward else 4) + state_bytes_per_parameter(cfg.state_dtype)


def _groups(params: list[nn.Parameter], cfg: Optimizer) -> list[dict[str, Any]]:
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _adamw(groups: list[dict[str, Any]], cfg: Optimizer) -> torch.optim.Optimizer:
    if cfg.state_dtype != "float32" or cfg.in_backward:  # (states made now, see SlicedAdamW)
        return SlicedAdamW(groups, STATE_DTYPES[cfg.state_dtype], lr=cfg.lr,
                           betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                           fused=cfg.implementation == "fused")
    impl = {"foreach": {"foreach": True}, "fused": {"fused": True},
            "for-loop": {"foreach": False}}[cfg.implementation]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **impl)


def clip_gradients(parameters: list[torch.Tensor], max_norm: float,
                   pipeline_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale gradients so their global L2 norm is at most ``max_norm`` (0: never); returns the
    norm before clipping, over all ranks' shards (DTensor gradients) and, given the pipeline's
    group, over the other stages' parameters too."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if isinstance(total_norm, DTensor):  # partial norms of the shards -> reduce across ranks
        total_norm = total_norm.full_tensor()
    if pipeline_group is not None:  # each stage holds different parameters: add the squares
        squared = total_norm**2
        dist.all_reduce(squared, group=pipeline_group)
        total_norm = squared.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=True)
    return total_norm


class LossScaler:
    """Dynamic loss scaling for float16 compute (disabled: a scale of 1 that never changes).

    float16 gradients of small values underflow to zero, so the loss is multiplied by a large
    scale (2^16 at first) and the gradients divided by it before clipping; a step whose
    gradients hold an inf or NaN (the scale was too large) is skipped and the scale halved; after
    2,000 good steps it doubles: torch.amp.GradScaler's rule and defaults. Unlike GradScaler,
    the gradients are unscaled in place on whatever device holds them, with no flag tensors
    copied between devices (torch's ShardedGradScaler copies them to the host without waiting,
    which a CPU-offloaded gradient's kernel then reads early), and the skip decision is the
    caller's: the global gradient norm, which every rank computes alike, is finite or not."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # since the scale last changed

    def is_enabled(self) -> bool:
        return self.enabled

    def get_scale(self) -> float:
        return self.scale

    @torch.no_grad()
    def unscale_(self, parameters: list[torch.Tensor]) -> None:
        """Divide the gradients by the scale, in place."""
        if self.enabled:
            for param in parameters:
                if param.grad is not None:
                    param.grad.mul_(1.0 / self.scale)

    def update(self, found_inf: bool) -> None:
        """After a step: halve the scale on an overflow, double it after enough good steps."""
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])


def lr_factor(step: int, total_steps: int, cfg: LRScheduler) -> float:
    """Multiplier of the peak LR for 1-based optimizer step ``step``.

    Linear warmup reaching the peak at step ``warmup_steps`` (step 1 is above zero), then
    linear or cosine decay from 1 towards ``min_lr_ratio``, reached just after the last step
    so that the last step still learns when the floor is 0; constant keeps 1.
    """
    if step <= cfg.warmup_steps:
        return step / cfg.warmup_steps
    decay_steps = total_steps - cfg.warmup_steps
    if cfg.decay_type == "constant" or decay_steps <= 0:
        return 1.0
    progress = (step - cfg.warmup_steps) / (decay_steps + 1)
    if cfg.decay_type == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduler,
                       total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose k-th ``step()`` call sets the LR of optimizer step k+1."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k + 1, total_steps, cfg))
