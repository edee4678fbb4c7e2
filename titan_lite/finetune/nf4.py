"""QLoRA's frozen base: the blocks' linears stored in 4-bit NormalFloat (Dettmers et al., 2023).

The format and its kernels are torchao's ``NF4Tensor`` (the optional extra ``qlora``): blocks of
64 weights share an absmax scale, and the scales are themselves quantised to int8 in blocks of
256 ("double quantisation"), ~0.52 bytes per weight. ``F.linear`` on one dequantises it to the
input's dtype in forward and again in backward; nothing but the 4-bit form is kept. FSDP2 shards
it like any other parameter (torchao implements the all-gather extension).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

INSTALL_HINT = "pip install -e '.[qlora]' (torchao)"
BLOCK_SIZE, SCALER_BLOCK_SIZE = 64, 256  # the QLoRA paper's, and torchao's defaults
# 4-bit codes, an int8 scale per block, a float32 factor per block of scales
BYTES_PER_WEIGHT = 0.5 + 1 / BLOCK_SIZE + 4 / (BLOCK_SIZE * SCALER_BLOCK_SIZE)
# Rows dequantised at a time: torchao's dequantisation makes int64 code indices, 16 bytes per
# weight (0.9 GiB for an 8B FFN weight); in slices of 1024 rows they are at most 64 MiB.
DEQUANTIZE_ROWS = 1024


def nf4_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence these loggers: importing torchao on a machine without its CUDA kernels logs a
    'Failed to load ... .so' line per kernel library and a torch pytree deprecation."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@functools.cache
def _to_nf4() -> Callable[..., torch.Tensor]:
    if not nf4_available():
        raise ValueError(f"lora.quantize_base: 'nf4' needs torchao: {INSTALL_HINT}")
    with _quiet("torchao", "torch.utils._pytree"):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
    return to_nf4


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (or a DTensor's shard) is a quantised tensor subclass (NF4): a
    wrapper around its packed data (not a plain, nor a fake tensor of the estimator)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return is_traceable_wrapper_subclass(local)


def dequantized(tensor: torch.Tensor, rows_per_slice: int = DEQUANTIZE_ROWS) -> torch.Tensor:
    """A quantised tensor's dense values (in its nominal dtype), dequantised ``rows_per_slice``
    rows at a time where the rows split into whole scale blocks; any other tensor as it is."""
    if not is_quantized(tensor):
        return tensor
    rows, cols = tensor.shape
    slices = rows // rows_per_slice
    if slices <= 1 or rows % rows_per_slice or nf4_problems((rows, cols), slices):
        return tensor.get_original_weight()
    return torch.cat([part.get_original_weight() for part in torch.chunk(tensor, slices)])


@torch.no_grad()
def write_quantized(local: torch.Tensor, full: torch.Tensor, row_offset: int = 0) -> None:
    """Quantise the whole dense weight ``full`` and store the rows this rank holds (from
    ``row_offset``) in its NF4 shard ``local``. The whole weight, not the shard, is quantised:
    the format keeps one mean of the block scales per tensor, which every shard must share so
    that FSDP's all-gather of shards is the weight's quantisation."""
    quantized = _to_nf4()(full.to(local.device, local.dtype), BLOCK_SIZE, SCALER_BLOCK_SIZE)
    rows = local.shape[0]
    if rows != full.shape[0]:
        quantized = torch.chunk(quantized, full.shape[0] // rows)[row_offset // rows]
    names, _ = local.__tensor_flatten__()
    for name in names:
        getattr(local, name).copy_(getattr(quantized, name))


def nf4_problems(shape: tuple[int, int], shards: int) -> str | None:
    """Why a weight of ``shape`` split ``shards`` ways by rows cannot be NF4 (None: it can):
    each shard must hold whole blocks and whole blocks of scales, so that quantising a shard
    gives exactly that shard of the whole weight's quantisation."""
    rows, cols = shape
    numel = rows // shards * cols
    if rows % shards or numel % (BLOCK_SIZE * SCALER_BLOCK_SIZE):
        return (f"a {rows} x {cols} weight split {shards} way(s) is not a whole number of "
                f"{BLOCK_SIZE * SCALER_BLOCK_SIZE}-weight NF4 scale blocks per shard")
    return None


@torch.no_grad()
def quantize_linears(linears: Iterable[nn.Module], device: torch.device,
                     pin_memory: bool = False) -> None:
    """Give each linear an NF4 weight on ``device`` in place of its (meta-device) dense one
    (``pin_memory``: in page-locked host memory, from which copies to a GPU are asynchronous).
    Call it on the built model before sharding it: FSDP then shards the NF4 tensors, and the
    weights are written later, by the initialisation or the load (``write_quantized``)."""
    to_nf4 = _to_nf4()
    for module in linears:
        dense = torch.zeros(module.weight.shape, dtype=module.weight.dtype, device=device)
        quantized = to_nf4(dense, BLOCK_SIZE, SCALER_BLOCK_SIZE)
        module.weight = nn.Parameter(quantized.pin_memory() if pin_memory else quantized,
                                     requires_grad=False)


def device_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``tensor`` (plain or NF4) on ``device``, asynchronous from pinned host memory.
    Always a copy, also to the device it is on: a CPU run then holds what a GPU run holds, and
    the estimator counts it."""
    moved = tensor.to(device, non_blocking=True)  # NF4: torchao moves each inner tensor
    if moved.device != tensor.device:
        return moved
    copy = torch.empty_like(tensor)
    if not is_traceable_wrapper_subclass(tensor):
        return copy.copy_(tensor)
    for name in tensor.__tensor_flatten__()[0]:
        getattr(copy, name).copy_(getattr(tensor, name))
    return copy
