"""One micro-batch as the model and the loss take it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class Batch:
    inputs: torch.Tensor  # (batch, seq) token ids
    labels: torch.Tensor  # (batch, seq) next-token targets; IGNORE_INDEX where none
    positions: torch.Tensor | None = None  # (batch, seq) within each packed sample; None: causal

    def to(self, device: torch.device) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return Batch(move(self.inputs), move(self.labels), move(self.positions))

    @staticmethod
    def stack(batches: list[Batch]) -> Batch:
        """The rows of ``batches`` as one batch (all with positions, or none)."""
        positions = (None if batches[0].positions is None
                     else torch.cat([b.positions for b in batches]))
        return Batch(torch.cat([b.inputs for b in batches]),
                     torch.cat([b.labels for b in batches]), positions)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """What the model takes besides the inputs (packed samples' positions)."""
        return {} if self.positions is None else {"positions": self.positions}


class Rows(Protocol):
    """A data set cut into rows of seq_len tokens (text windows or packed samples)."""

    num_rows: int
    describe: str  # what the rows are made of, for error messages

    def batch(self, rows: np.ndarray) -> Batch:
        """These rows as a batch; a row index of -1 is an empty row without targets."""
        ...
