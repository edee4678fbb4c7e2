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
    ids = sample_ids(positions)
    batch, seq = positions.shape
    if positions.device.type == "cuda":
        def same_sample_causal(b, h, q, k):
            return (ids[b, q] == ids[b, k]) & (k <= q)

        return create_block_mask(same_sample_causal, batch, None, seq, seq,
                                 device=positions.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    allowed = ((ids[:, :, None] == ids[:, None, :]) & causal)[:, None]
    return torch.zeros(allowed.shape, device=positions.device).masked_fill_(~allowed,
                                                                            float("-inf"))


@functools.cache
def _compiled_flex_attention():
    # FlexAttention is only a fused kernel when compiled; eager runs a dense reference.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention of (batch, heads, seq, head_dim) tensors under ``mask``."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if isinstance(mask, BlockMask):
        flex = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
        return flex(q, k, v, block_mask=mask)
    if mask.is_floating_point() and mask.dtype != q.dtype:  # e.g. bf16 autocast
        mask = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCache:
    """Keys and values of every position decoded so far, per block, for generation: each new
    token then costs one position of compute instead of the whole prefix."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0  # positions already cached
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def positions(self, seq: int, device: torch.device) -> torch.Tensor:
        """(seq,) positions of the next ``seq`` tokens."""
        if self.length + seq > self.max_len:
            raise ValueError(f"generation needs {self.length + seq} positions, more than the "
                             f"cache's {self.max_len} (the model's max_seq_len)")
        return torch.arange(self.length, self.length + seq, device=device)

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
        their own position."""
        if self.length == 0:
            return None  # a prefill: plain causal
        if seq == 1:
            return torch.ones(1, 1, 1, self.length + 1, dtype=torch.bool, device=device)
        keys = torch.arange(self.length + seq, device=device)
        queries = torch.arange(self.length, self.length + seq, device=device)
        return (keys[None, :] <= queries[:, None])[None, None]

    def advance(self, seq: int) -> None:
        self.length += seq
