"""The training loss: cross entropy summed over target tokens, normalised by the global batch's
count of targets (ignored labels, e.g. masked prompts, count for nothing).

With masked labels micro-batches and ranks hold different numbers of targets, so the mean of
per-micro-batch means is not the mean over the batch. Every rank therefore sums its tokens'
losses and divides by the number of targets of the whole global batch (one all-reduce before
the step). The data-parallel gradient reduction averages over the ``dp`` ranks, so each rank's
loss is also multiplied by ``dp``: the reduced gradient is then exactly that of
sum(all targets' losses) / count(all targets).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # a label that is not a target (prompt token, padding, sample boundary)
# training.loss_chunks = 0 (auto): this many slices for vocabularies of AUTO_CHUNKS_VOCAB tokens
# or more (Llama 2's 32,000 included), where the float32 logits and their gradient are the
# step's largest temporaries; smaller vocabularies gain nothing from slicing.
AUTO_CHUNKS, AUTO_CHUNKS_VOCAB = 8, 32_000


Projection = Callable[[torch.Tensor], torch.Tensor]  # last hidden states -> logits


def cross_entropy_sum(hidden: torch.Tensor, labels: torch.Tensor, chunks: int = 1,
                      project: Projection | None = None, compiled: bool = False
                      ) -> torch.Tensor:
    """Summed cross entropy over the labels that are targets, of (batch, seq, vocab) logits, or
    with ``project`` (the model's output projection) of the logits of (batch, seq, dim) hidden
    states.

    ``chunks`` > 1: computed over that many slices of the tokens, each slice's projection and
    loss recomputed in backward (activation checkpointing), so the logits, their float32 copy,
    softmax and gradient exist for one slice at a time, never for the whole batch: for a 128k
    vocabulary at 2 x 2048 tokens that is ~7 GiB less at the peak. The same sum up to float
    rounding. Tensor parallel's layouts are not chunked: its sequence-sharded hidden states are
    projected whole, and vocab-sharded logits (loss parallel) go to the loss whole.
    ``compiled``: the cross entropy (not the projection, whose weight FSDP gathers in hooks)
    runs through torch.compile; tensor parallel's DTensor logits stay eager."""
    if project is not None and isinstance(hidden, DTensor):
        hidden, project = project(hidden), None
    if isinstance(hidden, DTensor):
        chunks, compiled = 1, False
    flat_hidden, flat_labels = hidden.flatten(0, 1), labels.flatten()
    if chunks <= 1:
        return _summed(flat_hidden, flat_labels, project, compiled)
    parts = zip(flat_hidden.chunk(chunks), flat_labels.chunk(chunks))
    return sum(checkpoint(_summed, part, target, project, compiled, use_reentrant=False)
               for part, target in parts)


def resolve_loss_chunks(configured: int, vocab_size: int, micro_batch_tokens: int) -> int:
    """``training.loss_chunks`` made concrete: ``configured`` unless it is 0 (auto), then
    AUTO_CHUNKS slices for a large vocabulary (at most one per token), else one piece."""
    if configured:
        return configured
    return min(AUTO_CHUNKS, micro_batch_tokens) if vocab_size >= AUTO_CHUNKS_VOCAB else 1


def loss_head(labels: torch.Tensor, chunks: int = 1, compiled: bool = False
              ) -> Callable[[torch.Tensor, Projection], torch.Tensor]:
    """A ``head`` for ``Transformer.forward``: the model returns the summed cross entropy of
    ``labels`` (``cross_entropy_sum``) instead of its logits, which are then computed slice by
    slice inside the loss and never held whole."""
    return lambda hidden, project: cross_entropy_sum(hidden, labels, chunks, project, compiled)


def _summed(hidden: torch.Tensor, labels: torch.Tensor, project: Projection | None,
            compiled: bool = False) -> torch.Tensor:
    logits = hidden if project is None else project(hidden)
    return (_compiled_cross_entropy() if compiled else _cross_entropy)(logits, labels)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE_INDEX)


@functools.cache
def _compiled_cross_entropy() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return torch.compile(_cross_entropy, fullgraph=True)


def count_targets(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` summed over every rank of the job (a copy; itself without a process group)."""
    value = value.clone()
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def global_target_count(labels: list[torch.Tensor], label_copies: int) -> torch.Tensor:
    """Targets in one optimizer step's global batch, given this rank's micro-batches' labels.
    ``label_copies``: how many ranks load the same labels (tensor- and pipeline-parallel
    peers). At least 1, so a batch without any target gives a zero loss, not NaN."""
    local = torch.stack([count_targets(t) for t in labels]).sum().to(torch.float32)
    return (sum_over_ranks(local) / label_copies).clamp(min=1)
