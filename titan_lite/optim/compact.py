"""AdamW with compact moments: bfloat16, or 8-bit block-wise quantised as in 8-bit Adam
(float32 too, for the step in backward, whose states must exist before the first step).

The parameters (the master weights) stay in their own dtype, float32 in training; only the two
moments shrink, from 8 bytes per parameter to 4 (bfloat16) or ~2.03 (int8 codes + one float32
scale per block of 256). The arithmetic is torch's own fused AdamW kernel, run in float32 on
slices of a parameter: each slice's moments are decoded into float32, stepped, and encoded
back, so no more than one slice's float32 moments exist at a time.

Why not a library's optimizer: torchao's ``AdamW8bit`` and bitsandbytes' CPU ``AdamW8bit``
both work on CPU tensors but step at ~26 s per billion parameters on this 2-core CPU, ~40x
slower than torch's fused AdamW (``bench/bench_optimizer.py speed``), and keep no float32
path (the step in backward needs one); their 8-bit format is reused here (torchao's dynamic
quantisation map), with a faster search for the nearest code (20.6 s per billion).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch._guards import active_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.tensor import DTensor
from torch.optim.adamw import adamw

from titan_lite.runtime.distributed import local_shard

BLOCK = 256  # values per int8 scale (8-bit Adam's and torchao's block size)
MIN_QUANTISED = 4096  # smaller tensors keep float32 moments (as bitsandbytes and torchao do)
SLICE = 1 << 22  # values decoded to float32 at a time
STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}
INT8_HINT = ("optimizer.state_dtype = 'int8' uses torchao's 8-bit quantisation map: "
             "pip install 'torchao>=0.18,<0.19' (or the qlora extra)")


def int8_available() -> bool:
    try:
        import torchao.optim.quant_utils  # noqa: F401
    except ImportError:
        return False
    return True


class SlicedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch's update rule and kernel) keeping ``exp_avg`` and
    ``exp_avg_sq`` in ``state_dtype`` (torch.float32, torch.bfloat16, or torch.uint8 for 8-bit
    codes); with float32 moments it steps exactly as torch's AdamW with the same kernel.

    The state of each parameter is created at once (not at the first step) with the
    parameter's sharding, so that it can be counted, checkpointed and loaded like AdamW's."""

    def __init__(self, params: Iterable[Any], state_dtype: torch.dtype, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, fused: bool = True):
        if state_dtype not in STATE_DTYPES.values():
            raise ValueError(f"state dtype {state_dtype}: one of {list(STATE_DTYPES.values())}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.state_dtype, self.fused = state_dtype, fused
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param] = self._new_state(param)

    def _new_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        # where torch's AdamW keeps the step count: on the device for its fused kernel
        step_device = local_shard(param).device if self.fused else torch.device("cpu")
        state = {"step": torch.zeros((), dtype=torch.float32, device=step_device)}
        if not self._quantised(param):
            dtype = torch.float32 if self.state_dtype == torch.uint8 else self.state_dtype
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(param, dtype=dtype)
            return state
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(param, dtype=torch.uint8)
            state[f"{key}_scale"] = _block_scales(param)
        return state

    def _quantised(self, param: torch.Tensor) -> bool:
        """int8 moments for a tensor whose rows split into whole blocks (so a block never
        spans two ranks' shards of dim 0); the others keep float32 moments."""
        return (self.state_dtype == torch.uint8 and param.ndim >= 2
                and param.shape[-1] % BLOCK == 0 and param.numel() >= MIN_QUANTISED)

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("SlicedAdamW.step takes no closure")
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step_parameter(param, group)

    def _step_parameter(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        values, grads = local_shard(param).view(-1), local_shard(param.grad).view(-1)
        beta1, beta2 = group["betas"]
        step_before = state["step"].clone()
        state["step"] += 1
        for start in range(0, values.numel(), SLICE):
            end = min(start + SLICE, values.numel())
            exp_avg = self._decode(state, "exp_avg", start, end, signed=True)
            exp_avg_sq = self._decode(state, "exp_avg_sq", start, end, signed=False)
            adamw(
                [values[start:end]], [grads[start:end]], [exp_avg], [exp_avg_sq], [],
                [step_before.clone()], fused=self.fused, foreach=None if self.fused else True,
                amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
            self._encode(state, "exp_avg", start, end, exp_avg, signed=True)
            self._encode(state, "exp_avg_sq", start, end, exp_avg_sq, signed=False)

    def _decode(self, state: dict[str, torch.Tensor], key: str, start: int, end: int,
                signed: bool) -> torch.Tensor:
        """The moment's values [start, end) in float32: the stored tensor itself (float32), or
        decoded into a reused buffer (a fresh one per slice costs page faults)."""
        stored = local_shard(state[key]).view(-1)[start:end]
        if stored.dtype == torch.float32:
            return stored
        out = _workspace(stored.device, end - start)[int(signed)]
        if stored.dtype != torch.uint8:
            return out.copy_(stored)
        tables = _tables(stored.device, signed)
        torch.index_select(tables.values, 0, stored.int(), out=out)
        scale = local_shard(state[f"{key}_scale"]).view(-1)[start // BLOCK:end // BLOCK]
        return out.view(-1, BLOCK).mul_(scale.view(-1, 1)).view(-1)

    def _encode(self, state: dict[str, torch.Tensor], key: str, start: int, end: int,
                values: torch.Tensor, signed: bool) -> None:
        stored = local_shard(state[key]).view(-1)[start:end]
        if stored.dtype == torch.float32:
            return  # stepped in place
        if stored.dtype != torch.uint8:
            stored.copy_(values)
            return
        from torchao.optim.quant_utils import scale_tensor
        normalised, scale = scale_tensor(values, BLOCK)
        stored.copy_(_tables(stored.device, signed).quantise(normalised))
        local_shard(state[f"{key}_scale"]).view(-1)[start // BLOCK:end // BLOCK].copy_(scale)


_WORKSPACES: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device, size: int) -> torch.Tensor:
    """Two slices of float32 moments, shared by every SlicedAdamW of the process (their steps
    run one at a time: the training thread's, or the step-in-backward worker's)."""
    if active_fake_mode() is not None:  # the estimator: a buffer of this step's own, counted
        return torch.empty(2, size, device=device)
    if device not in _WORKSPACES or _WORKSPACES[device].shape[1] < size:
        _WORKSPACES[device] = torch.empty(2, size, device=device)
    return _WORKSPACES[device][:, :size]


@functools.cache
def _tables(device: torch.device, signed: bool) -> _CodeTables:
    with unset_fake_temporarily():  # real, also when the estimator traces the step
        return _CodeTables(signed, device)


class _CodeTables:
    """8-bit Adam's dynamic quantisation map (torchao's), with a lookup table that finds each
    value's nearest code in two gathers instead of torchao's eight-step search: the table is
    keyed by a float32's upper 16 bits, whose range holds at most one midpoint between two
    codes (its relative width, 2^-7, is below the map's finest relative spacing), so the key's
    lowest code plus one comparison with that midpoint is the nearest code (equal to torchao's
    ``quantize_8bit_with_qmap`` but for float rounding at exact midpoints: 7 of 4M codes)."""

    def __init__(self, signed: bool, device: torch.device):
        from torchao.optim.quant_utils import create_dynamic_map, quantize_8bit_with_qmap
        self.values = torch.tensor(create_dynamic_map(signed=signed), device=device)
        bits = (torch.arange(1 << 16, dtype=torch.int32, device=device) - (1 << 15)) << 16
        ends = torch.stack([bits.view(torch.float32), (bits | 0xFFFF).view(torch.float32)])
        lowest = torch.nan_to_num(ends.amin(0), nan=0.0).clamp(-1, 1)
        self.codes = quantize_8bit_with_qmap(lowest, self.values)
        down, up = self.codes.long(), (self.codes.long() + 1).clamp(max=255)
        self.midpoints = self.values[down] + (self.values[up] - self.values[down]) * 0.5
        self.midpoints[self.codes == 255] = float("inf")

    def quantise(self, normalised: torch.Tensor) -> torch.Tensor:
        """uint8 codes of float32 values in [-1, 1]."""
        key = (normalised.view(torch.int32) >> 16) + (1 << 15)
        return self.codes.index_select(0, key) + (normalised >= self.midpoints.index_select(
            0, key))


def _block_scales(param: torch.Tensor) -> torch.Tensor:
    """One float32 scale per block of ``BLOCK`` values along the last dim, sharded as the
    parameter (rows split across ranks keep their scales)."""
    local = local_shard(param)
    scales = torch.zeros(*local.shape[:-1], local.shape[-1] // BLOCK, device=local.device)
    if not isinstance(param, DTensor):
        return scales
    shape = (*param.shape[:-1], param.shape[-1] // BLOCK)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(scales, param.device_mesh, param.placements, run_check=False,
                              shape=shape, stride=stride).to(local.device)


def state_bytes_per_parameter(state_dtype: str) -> float:
    """Bytes of AdamW's two moments per (large) parameter in ``state_dtype``."""
    return {"float32": 8.0, "bfloat16": 4.0, "int8": 2.0 + 2 * 4 / BLOCK}[state_dtype]
