"""The optimizer step inside backward, on the host (``optimizer.in_backward``).

With CPU offload FSDP2 copies each unit's (a block's, then the root's) reduce-scattered
gradient shards to host memory as backward reaches it, and calls the sharded parameters'
post-accumulate-grad hooks. Here the last of a unit's hooks hands the unit's AdamW step to a
worker thread, so the host cores step that unit while the GPU computes the backward of the
blocks before it; the unit's gradients are freed once it has stepped. The host therefore never
holds the whole model's gradients: at most the unit being stepped and the one arriving.

Each unit has its own optimizer; their parameter groups are shared dicts, so one LR schedule
(over ``param_groups``) drives them all, and ``state`` maps every parameter to its state as
a single optimizer's does (what checkpoints read and write).

The global gradient norm is known only after every unit has stepped: it is computed (each
unit's share, summed over ranks at the end) and logged, but gradients cannot be clipped by it,
so ``training.max_norm`` must be 0 with this knob. float16's loss scale still works: each
unit unscales its own gradients and skips its step when they are not finite (on the rank
whose shard holds them: the other shards of the unit, and the other units, step, unlike the
ordinary step, which skips everything); the scale halves when any unit on any rank skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from titan_lite.runtime.distributed import local_shard


def fsdp_units(model: nn.Module) -> list[list[nn.Parameter]]:
    """The trainable parameters of each ``fully_shard``ed module in ``model`` (without those
    of the FSDP modules inside it)."""
    units = []
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        inner = {id(p) for sub in module.modules()
                 if sub is not module and isinstance(sub, FSDPModule) for p in sub.parameters()}
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in inner]
        if params:
            units.append(params)
    return units


class StepInBackward(torch.optim.Optimizer):
    """One optimizer per FSDP unit, each stepped on a worker thread as soon as backward has
    delivered the unit's gradients (see the module's docstring).

    Call ``arm(last)`` before each micro-batch's backward (only the last one steps) and
    ``finish()`` after it; ``step()`` steps every unit at once (what a checkpoint's load uses
    to create the state)."""

    def __init__(self, units: list[list[nn.Parameter]],
                 make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
                 group_options: Callable[[list[nn.Parameter]], list[dict[str, Any]]],
                 loss_scale: Callable[[], float] = lambda: 1.0, synchronous: bool = False):
        """``group_options(params)``: the parameter groups (dicts) of one unit;
        ``make_optimizer(groups)``: its optimizer; ``loss_scale()``: float16's current scale
        (1: none), by which the unit's gradients are divided before its step.
        ``synchronous``: no worker thread; a unit steps on the training thread when the next
        one's gradients arrive (the same memory; what the estimator's fake tensors need)."""
        self.units = units
        self.optimizers = [make_optimizer(group_options(params)) for params in units]
        all_params = [p for params in units for p in params]
        super().__init__(all_params, self.optimizers[0].defaults)
        # shared group dicts: the LR schedule sets each unit optimizer's lr
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self._unit_of = {p: i for i, params in enumerate(units) for p in params}
        self.state = _UnitStates(self.optimizers, self._unit_of)  # type: ignore[assignment]
        self._loss_scale = loss_scale
        self._waiting = [len(params) for params in units]  # hooks still to come per unit
        self._armed = False
        self._worker = None if synchronous else ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="step-in-backward")
        self._running: Future | int | None = None  # a unit's step under way, or deferred
        self._squares: list[torch.Tensor] = []  # per unit stepped: sum of squared grads
        self._overflow = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._gradient_ready)
                       for p in all_params]

    def arm(self, last_micro_batch: bool) -> None:
        """Whether the coming backward completes the step's gradients (then units step)."""
        self._armed = last_micro_batch

    def _gradient_ready(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        unit = self._unit_of[param]
        self._waiting[unit] -= 1
        if self._waiting[unit] == 0:
            self._wait_running()  # one unit steps at a time: the host holds two at most
            self._running = (unit if self._worker is None
                             else self._worker.submit(self._step_unit, unit))

    def _wait_running(self) -> None:
        running, self._running = self._running, None
        if isinstance(running, int):
            self._step_unit(running)
        elif running is not None:
            running.result()  # a step's exception surfaces here

    @torch.no_grad()
    def _step_unit(self, unit: int) -> None:
        local = [local_shard(p.grad) for p in self.units[unit] if p.grad is not None]
        scale = self._loss_scale()
        if scale != 1.0 and local:
            torch._foreach_mul_(local, 1.0 / scale)
        norm = torch.nn.utils.get_total_norm(local, foreach=True) if local else torch.zeros(())
        self._squares.append(norm.double().cpu() ** 2)
        if scale != 1.0 and not torch.isfinite(self._squares[-1]):
            self._overflow = True
        else:
            self.optimizers[unit].step()
        self.optimizers[unit].zero_grad(set_to_none=True)

    def finish(self) -> tuple[torch.Tensor, bool]:
        """After the last micro-batch's backward: wait for the steps; returns the global
        gradient norm (over every rank's shards) and whether any unit skipped its step for
        inf/NaN gradients (float16), agreed by all ranks."""
        self._wait_running()
        for unit, waiting in enumerate(self._waiting):  # units some of whose parameters got
            if 0 < waiting < len(self.units[unit]):     # no gradient step with the others'
                self._step_unit(unit)
        self._waiting = [len(params) for params in self.units]
        self._armed = False
        self._opt_called = True  # what torch's LR schedulers look for: this step happened
        squares = torch.stack(self._squares).sum() if self._squares else torch.zeros(
            (), dtype=torch.float64)
        self._squares = []
        squares = _sum_over_shards(squares, self.units)
        overflow, self._overflow = self._overflow, False
        if self._loss_scale() != 1.0 and dist.is_initialized():  # float16: agree on a skip
            flag = torch.tensor(float(overflow))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            overflow = bool(flag.item())
        return squares.sqrt().float(), overflow

    def step(self, closure: Any = None) -> None:  # noqa: D102 - every unit, now
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def close(self) -> None:
        """Remove the hooks and stop the worker."""
        for hook in self._hooks:
            hook.remove()
        if self._worker is not None:
            self._worker.shutdown(wait=True)


class _UnitStates(Mapping):
    """Parameter -> its state in its unit's optimizer (read-only: a write would land in no
    unit's optimizer)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer],
                 unit_of: dict[torch.Tensor, int]):
        self._optimizers, self._unit_of = optimizers, unit_of

    def __getitem__(self, param: torch.Tensor) -> dict[str, Any]:
        state = self._optimizers[self._unit_of[param]].state
        if param not in state:
            raise KeyError(param)
        return state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (p for p in self._unit_of if p in self._optimizers[self._unit_of[p]].state)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _sum_over_shards(squares: torch.Tensor, units: list[list[nn.Parameter]]) -> torch.Tensor:
    """Sum the local sum of squares over the mesh dims the parameters are sharded on (FSDP's;
    replicas of HSDP hold equal gradients and are not added)."""
    param = units[0][0] if units else None
    if not isinstance(param, DTensor):
        return squares
    for dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard) and param.device_mesh.size(dim) > 1:
            # the host's gloo group: the squares are on the host
            dist.all_reduce(squares, group=param.device_mesh.get_group(dim))
    return squares
