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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # a label that is not a target (prompt token, padding, sample boundary)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      chunks: int = 1) -> torch.Tensor:
    """Summed cross entropy of (batch, seq, vocab) logits over the labels that are targets.

    ``chunks`` > 1: computed over that many slices of the tokens, each recomputed in backward
    (activation checkpointing), so the float32 copy of the logits, its softmax and its
    gradient exist for one slice at a time instead of the whole batch: for a 128k vocabulary
    at 2 x 2048 tokens that is ~6 GiB less at the peak. The same sum up to float rounding.
    Vocab-sharded logits (tensor parallel's loss parallel) are not chunked."""
    flat_logits, flat_labels = logits.flatten(0, 1), labels.flatten()
    if chunks <= 1 or isinstance(logits, DTensor):
        return _summed(flat_logits, flat_labels)
    parts = zip(flat_logits.chunk(chunks), flat_labels.chunk(chunks))
    return sum(checkpoint(_summed, part, target, use_reentrant=False)
               for part, target in parts)


def _summed(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=IGNORE_INDEX)


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
