"""Which keys each query may see: causal, causal within each packed sample, or a decode cache.

Packed instruction rows hold several samples back to back; their ``positions`` restart at 0 at
every sample, which is all the model needs to keep the samples apart. The mask is built once
per forward and shared by every block. On CUDA it is a FlexAttention ``BlockMask`` (block-sparse
metadata, no seq x seq tensor; the compiled kernel skips fully masked blocks); elsewhere it is
one additive float32 (batch, 1, seq, seq) mask for SDPA's fused CPU flash kernel, built once:
a boolean one would be converted to float, and kept for backward, by every block.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

AttentionMask = torch.Tensor | BlockMask | None  # None: plain causal


def sample_ids(positions: torch.Tensor) -> torch.Tensor:
    """(batch, seq) index of the sample each token belongs to: a new one wherever the
    position restarts at 0."""
    return (positions == 0).cumsum(dim=-1)


def document_mask(positions: torch.Tensor) -> AttentionMask:
    """Causal attention that never crosses from one packed sample into another."""
    if positions.device.type == "cuda":
        return document_block_mask(positions)
    ids = sample_ids(positions)
    seq = positions.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    allowed = ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]
    return torch.zeros(allowed.shape, device=positions.device).masked_fill_(~allowed,
                                                                            float("-inf"))


def document_block_mask(positions: torch.Tensor) -> BlockMask:
    """``document_mask`` as FlexAttention's block mask (what CUDA uses)."""
    ids = sample_ids(positions)
    batch, seq = positions.shape

    def same_sample_causal(b, h, q, k):
        return (ids[b, q] == ids[b, k]) & (k <= q)

    return _compiled_create_block_mask()(same_sample_causal, batch, None, seq, seq,
                                         device=positions.device)


@functools.cache
def _compiled_create_block_mask():
    # Eager, it evaluates the mask at every (query, key) pair: a batch x seq x seq boolean
    # tensor per forward (0.5 GiB at 8 x 8192); compiled, it works block by block.
    return torch.compile(create_block_mask)


@functools.cache
def _compiled_flex_attention():
    # FlexAttention is only a fused kernel when compiled; eager runs a dense reference.
    return torch.compile(flex_attention, dynamic=False)


# Compiled FlexAttention's tile sizes. torch's defaults are tuned on A100/H100-class parts
# (163 / 227 KB of shared memory per block); cards of the same generations with ~99 KB
# (RTX 3090/4090, A10G, L4, L40) or 64 KB (T4) cannot run them: at head_dim 128 in bf16 the
# backward asks for 128 KB ("out of resource: shared memory", pytorch#133254). Below that
# budget the largest tiles whose estimate fits are named explicitly, largest first.
TUNED_SHARED_MEMORY = 160 * 1024  # at or above: torch's own choice
_RESERVE = 8 * 1024  # beside the tiles: row statistics, block indices, Triton's scratch
_FORWARD_TILES = [(128, 64, 3), (64, 64, 3), (64, 64, 2), (64, 32, 2), (32, 32, 2), (32, 16, 1),
                  (16, 16, 1)]  # (BLOCK_M, BLOCK_N, num_stages)
_BACKWARD_TILES = [(64, 64, 64, 64, 3), (64, 64, 64, 64, 2), (32, 64, 64, 32, 2),
                   (32, 64, 64, 32, 1), (32, 32, 32, 32, 1), (16, 16, 16, 16, 1)]
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_stages)


def flex_forward_bytes(tiles: tuple[int, int, int], head_dim: int, element_bytes: int) -> int:
    """Shared memory of the forward kernel: a query tile, and per pipeline stage a key and a
    value tile."""
    block_m, block_n, stages = tiles
    return element_bytes * head_dim * (block_m + 2 * stages * block_n)


def flex_backward_bytes(tiles: tuple[int, int, int, int, int], head_dim: int,
                        element_bytes: int) -> int:
    """Shared memory of the backward kernel, the larger of its two loops: dK/dV (key and value
    tiles held, query and output-gradient tiles per stage) and dQ (the converse)."""
    block_m1, block_n1, block_m2, block_n2, stages = tiles
    rows = max(2 * block_n1 + 2 * stages * block_m1, 2 * block_m2 + 2 * stages * block_n2)
    return element_bytes * head_dim * rows


def flex_kernel_options(shared_memory: int, head_dim: int, element_bytes: int
                        ) -> dict[str, int] | None:
    """FlexAttention ``kernel_options`` for a GPU with ``shared_memory`` bytes per block
    (``shared_memory_per_block_optin``); None: torch's defaults fit."""
    if shared_memory >= TUNED_SHARED_MEMORY:
        return None
    head_dim = 1 << (head_dim - 1).bit_length()  # the kernels pad head_dim to a power of 2
    budget = shared_memory - _RESERVE
    forward = next((t for t in _FORWARD_TILES
                    if flex_forward_bytes(t, head_dim, element_bytes) <= budget),
                   _FORWARD_TILES[-1])
    backward = next((t for t in _BACKWARD_TILES
                     if flex_backward_bytes(t, head_dim, element_bytes) <= budget),
                    _BACKWARD_TILES[-1])
    return {"fwd_BLOCK_M": forward[0], "fwd_BLOCK_N": forward[1], "fwd_num_stages": forward[2],
            **{f"bwd_{key}": value for key, value in zip(
                ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2", "num_stages"), backward)}}


@functools.cache
def _device_kernel_options(device: torch.device, head_dim: int, element_bytes: int
                           ) -> dict[str, int] | None:
    properties = torch.cuda.get_device_properties(device)
    shared_memory = getattr(properties, "shared_memory_per_block_optin", None)
    if shared_memory is None:  # (an older torch): leave the choice to torch
        return None
    return flex_kernel_options(shared_memory, head_dim, element_bytes)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention of (batch, heads, seq, head_dim) tensors under ``mask``.
    ``k`` and ``v`` may have fewer heads (grouped-query attention): the kernels share each kv
    head among its query heads themselves, so no expanded copy is made and kept for backward
    (4x the keys and values of an 8B)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, BlockMask):
        if q.device.type != "cuda":
            return flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        options = _device_kernel_options(q.device, q.shape[-1], q.element_size())
        return _compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=gqa,
                                          kernel_options=options)
    if mask.is_floating_point() and mask.dtype != q.dtype:  # e.g. bf16 autocast
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class KVCache:
    """Keys and values of every position decoded so far, per block, for generation: each new
    token then costs one position of compute instead of the whole prefix.

    ``pads`` (batch,): a batch of prompts of different lengths, each left-padded by that many
    positions. A row's pad positions are never attended to and its own positions start after
    them, so each row decodes as it would alone."""

    def __init__(self, max_len: int, pads: torch.Tensor | None = None):
        self.max_len = max_len
        self.pads = pads
        self.length = 0  # positions already cached
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def positions(self, seq: int, device: torch.device) -> torch.Tensor:
        """(seq,) positions of the next ``seq`` tokens; (batch, seq) with pads."""
        if self.length + seq > self.max_len:
            raise ValueError(f"generation needs {self.length + seq} positions, more than the "
                             f"cache's {self.max_len} (the model's max_seq_len)")
        positions = torch.arange(self.length, self.length + seq, device=device)
        if self.pads is None:
            return positions
        return (positions[None, :] - self.pads[:, None]).clamp(min=0)

    def keep(self, rows: torch.Tensor) -> None:
        """Go on with only these rows of the batch (the others have finished)."""
        for cached in (self._keys, self._values):
            for block, tensor in cached.items():
                cached[block] = tensor[rows]
        if self.pads is not None:
            self.pads = self.pads[rows]

    def update(self, block: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store block ``block``'s new (batch, kv_heads, seq, head_dim) keys and values; return
        all of its keys and values so far."""
        if block not in self._keys:
            shape = (*k.shape[:2], self.max_len, k.shape[-1])
            self._keys[block] = k.new_zeros(shape)
            self._values[block] = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self._keys[block][:, :, self.length:end] = k
        self._values[block][:, :, self.length:end] = v
        return self._keys[block][:, :, :end], self._values[block][:, :, :end]

    def mask(self, seq: int, device: torch.device) -> AttentionMask:
        """Queries at the next ``seq`` positions see every cached key and the new ones up to
        their own position (with pads: none of a row's pad positions, and a pad query only
        itself, so that no row of the softmax is empty)."""
        if self.pads is not None:
            keys = torch.arange(self.length + seq, device=device)
            queries = torch.arange(self.length, self.length + seq, device=device)
            causal = keys[None, :] <= queries[:, None]
            allowed = causal[None] & (keys[None, None, :] >= self.pads[:, None, None])
            return (allowed | (keys[None, :] == queries[:, None])[None])[:, None]
        if self.length == 0:
            return None  # a prefill: plain causal
        if seq == 1:
            return torch.ones(1, 1, 1, self.length + 1, dtype=torch.bool, device=device)
        keys = torch.arange(self.length + seq, device=device)
        queries = torch.arange(self.length, self.length + seq, device=device)
        return (keys[None, :] <= queries[:, None])[None, None]

    def advance(self, seq: int) -> None:
        self.length += seq
