"""Llama 3 in plain torch.nn: GQA, RoPE (with Llama 3.1 scaling), SwiGLU, RMSNorm; and the
switches that make it Qwen2 (q/k/v biases) or Qwen3 (q/k norms, its own head size).

No distributed code lives here; parallelism is applied from titan_lite/parallel/.
Build on the meta device, move with ``to_empty`` and call ``init_weights`` to materialise.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from titan_lite.models.llama3.args import ModelArgs, RopeScaling
from titan_lite.models.llama3.attention import AttentionMask, KVCache, attend, document_mask

# Transformer.forward's optional head: (final hidden states, output projection) -> output
Head = Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama 3.1 scaling when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, interpolated)
    scaled = torch.where(wavelen < high_wavelen, inv_freq, scaled)
    return scaled.float()


def rope_table(args: ModelArgs, seq_len: int) -> torch.Tensor:
    """(seq_len, head_dim/2) complex64 table of e^(i * position * frequency)."""
    inv_freq = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the head dim, as Meta's checkpoints expect.

    x: (batch, seq, heads, head_dim); rope: complex phases, (>= seq, head_dim/2) for
    positions 0..seq-1, or (batch, seq, head_dim/2) for each token's own position. Each pair is
    read as one complex number and multiplied by its position's phase (one complex multiply is
    the rotation).
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    if rope.ndim == 2:
        rope = rope[: x.shape[1]]
    rotated = torch.view_as_real(pairs * rope.unsqueeze(-2))
    return rotated.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id  # its slot in a KVCache
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        # Qwen3: each head's q and k normalised (one weight shared by the heads) before RoPE
        self.q_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, args.norm_eps) if args.qk_norm else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask = None,
                cache: KVCache | None = None) -> torch.Tensor:
        bsz, seq, _ = x.shape
        # -1 instead of the head counts so that tensor parallel (fewer local heads) needs no change.
        q = self.wq(x).view(bsz, seq, -1, self.head_dim)
        k = self.wk(x).view(bsz, seq, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        v = self.wv(x).view(bsz, seq, -1, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = attend(q, k, v, mask)  # (grouped-query attention: fewer kv heads than q heads)
        return self.wo(out.transpose(1, 2).reshape(bsz, seq, -1))

    def init_weights(self, std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.trunc_normal_(self.wo.weight, std=std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=0.02)
        nn.init.trunc_normal_(self.w2.weight, std=std)
        nn.init.trunc_normal_(self.w3.weight, std=std)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        # Depth-scaled init of the residual projections keeps the residual stream's variance flat.
        self.residual_init_std = 0.02 / math.sqrt(2 * (layer_id + 1))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: AttentionMask = None,
                cache: KVCache | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, cache)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(self.residual_init_std)
        self.feed_forward.init_weights(self.residual_init_std)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A ModuleDict keyed by layer index keeps names stable when pipeline stages drop layers.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args)
                                     for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied models reuse the embedding matrix in forward() instead of sharing a Parameter,
        # which would break on to_empty() and under sharding.
        self.output = None if args.tie_word_embeddings else nn.Linear(args.dim, args.vocab_size,
                                                                      bias=False)
        self.register_buffer("rope", rope_table(args, args.max_seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None, head: Head | None = None) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab).

        ``positions`` (batch, seq): each token's position in its own sample, restarting at 0
        where a packed row starts a new sample; attention then stays within each sample. None:
        one causal sequence at positions 0..seq-1. ``cache``: generation, continuing after the
        positions the cache holds. A pipeline stage holds only some of the modules (the others
        are None): without the embedding it takes hidden states in, without the final norm it
        hands them on. ``head(hidden, project)``: what to return instead of the logits, given
        the final norm's output and the output projection (e.g. the loss, computed from the
        logits slice by slice; run inside forward, so parallel wrappers see the projection
        used where they expect it).
        """
        seq = tokens.shape[1]
        if cache is not None:
            positions = cache.positions(seq, tokens.device)
            mask = cache.mask(seq, tokens.device)
        elif positions is not None:
            mask = document_mask(positions)
        else:
            mask = None
        if seq > self.rope.shape[0]:  # (packed positions never exceed their row's length)
            raise ValueError(f"sequence length {seq} exceeds max_seq_len {self.rope.shape[0]}")
        # Without positions the blocks slice the table themselves: under sequence parallel a
        # later pipeline stage's input holds only this rank's part of the sequence.
        rope = self.rope if positions is None else self.rope[positions]
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, rope, mask, cache)
        if cache is not None:
            cache.advance(seq)
        if self.norm is None:
            return h
        h = self.norm(h)
        return self.project(h) if head is None else head(h, self.project)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection: final hidden states -> logits."""
        if self.args.tie_word_embeddings:
            # (a cast only when the table is stored narrower, e.g. a frozen fine-tuning base)
            return F.linear(h, self.tok_embeddings.weight.to(h.dtype))
        return self.output(h)

    @torch.no_grad()
    def init_weights(self, seed: int = 0,
                     unit_context: Callable[[nn.Module], ContextManager] = nullcontext) -> None:
        """(Re)initialise every parameter and buffer in place; works after ``to_empty``.

        Each unit (the embedding, every block, the final norm, the output) draws from the RNG
        re-seeded from ``seed`` and the unit's name, so its values depend neither on the other
        units this process holds (a pipeline stage) nor on the order. ``unit_context(module)``
        is entered around each unit: a parallel layout uses it to present sharded parameters as
        full tensors while they are drawn, so every layout starts from the same weights.
        """
        self.init_buffers()
        for name, module, init in self._init_units():
            with unit_context(module):
                torch.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
                init()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the non-learned buffers (the RoPE table) after ``to_empty``; weights are left
        as they are, e.g. for loading a checkpoint over them. The table is assigned, not
        copied into: casting the model (``.to(torch.bfloat16)``) also casts complex buffers."""
        self.rope = rope_table(self.args, self.rope.shape[0]).to(self.rope.device)

    def _init_units(self) -> list[tuple[str, nn.Module, Callable[[], None]]]:
        args = self.args
        units: list[tuple[str, nn.Module, Callable[[], None]]] = []
        if self.tok_embeddings is not None:
            std = args.dim**-0.5 if args.tie_word_embeddings else 1.0
            units.append(("tok_embeddings", self.tok_embeddings,
                          lambda: nn.init.normal_(self.tok_embeddings.weight, std=std)))
        units += [(f"layers.{key}", block, block.init_weights)
                  for key, block in self.layers.items()]
        if self.norm is not None:
            units.append(("norm", self.norm, self.norm.reset_parameters))
        if self.output is not None:
            bound = 3 * args.dim**-0.5
            units.append(("output", self.output, lambda: nn.init.trunc_normal_(
                self.output.weight, std=args.dim**-0.5, a=-bound, b=bound)))
        return units

    def num_params(self, exclude_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embedding and self.output is not None:
            total -= self.tok_embeddings.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 x (trained matmul weights) + 4 x (frozen ones: forward
        and the input gradient, no weight gradient) + attention scores and values.

        The embedding lookup and norm weights are not matmuls; the output projection is.
        Attention counts the full (non-causal) score matrix, as the PaLM/torchtitan MFU
        convention does.
        """
        lookup = self.tok_embeddings.weight if self.output is not None else None  # untied
        matmul_flops = sum((6 if p.requires_grad else 4) * p.numel() for p in self.parameters()
                           if p.ndim == 2 and p is not lookup)
        a = self.args
        return matmul_flops + 12 * a.n_layers * a.n_heads * a.head_dim * seq_len
