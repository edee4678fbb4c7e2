"""Held-out loss (and sample answers) during training, in every layout that trains.

Forward only, under ``torch.no_grad``, in eval mode (dropout off) and with the random number
generators restored afterwards: gradients, the optimizer, the RNG and the training data position
are untouched, so a run with validation trains exactly as one without it and resumes exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from titan_lite.config import JobConfig
from titan_lite.data import Batch, ChatTemplate, ValidationLoader
from titan_lite.runtime.distributed import full_tensor
from titan_lite.inference.generation import generate, prompt_ids, stop_ids
from titan_lite.loss import count_targets, loss_head, sum_over_ranks
from titan_lite.parallel.pp import Pipeline
from titan_lite.data.tokenizer import Tokenizer


@dataclass
class ValidationResult:
    loss: float  # mean cross entropy over every validation target of every rank
    targets: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


class Validator:
    """Runs the validation set through ``runner`` (the training module, or the pipeline)."""

    def __init__(self, loader: ValidationLoader, runner: nn.Module | Pipeline,
                 device: torch.device, autocast: torch.autocast, loss_context,
                 tp_degree: int, label_copies: int, loss_chunks: int):
        """``tp_degree``: ranks holding the same loss; ``label_copies``: ranks loading the
        same labels (tensor- and pipeline-parallel peers); ``loss_chunks``: slices the loss
        is computed in (``cross_entropy_sum``), so the logits are never held whole."""
        self.loader, self.runner, self.device = loader, runner, device
        self.autocast, self.loss_context = autocast, loss_context
        self.tp_degree, self.label_copies = tp_degree, label_copies
        self.loss_chunks = loss_chunks

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        if isinstance(self.runner, Pipeline):
            with self.autocast, self.loss_context():
                return full_tensor(self.runner.evaluate(batch))
        with self.loss_context(), self.autocast:
            return full_tensor(self.runner(batch.inputs, **batch.model_kwargs(),
                                           head=loss_head(batch.labels, self.loss_chunks)))

    @torch.no_grad()
    def run(self) -> ValidationResult:
        totals = torch.zeros(2, device=self.device, dtype=torch.float64)
        for batch in self.loader:
            batch = batch.to(self.device)
            totals[0] += self._loss_sum(batch).double()
            totals[1] += count_targets(batch.labels)
        loss_sum, count = sum_over_ranks(totals).tolist()
        count /= self.label_copies
        return ValidationResult(loss_sum / self.tp_degree / max(count, 1.0), int(count))


def sample_answers(model: nn.Module, cfg: JobConfig, tokenizer: Tokenizer,
                   template: ChatTemplate | None, device: torch.device) -> list[str]:
    """The model's answers to ``validation.sample_prompts`` (a chat user turn when the data is
    instruction data), one "prompt -> answer" line each."""
    lines = []
    for text in cfg.validation.sample_prompts:
        ids = prompt_ids(text, tokenizer, template, system=cfg.generation.system)
        out = generate(model, ids, cfg.generation, stop_ids(tokenizer, template), device)
        lines.append(f"{text!r} -> {tokenizer.decode(out.ids)!r}")
    return lines


@contextlib.contextmanager
def evaluating(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Within it ``modules`` are in eval mode (dropout off), and the CPU's and ``device``'s
    random number generators are put back as they were on leaving, so whatever runs inside
    (sampling included) leaves training's random stream untouched."""
    was_training = [module.training for module in modules]
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        try:
            for module in modules:
                module.eval()
            yield
        finally:
            for module, mode in zip(modules, was_training):
                module.train(mode)


class Evaluation:
    """What runs at each validation point: the held-out loss and the sample answers."""

    def __init__(self, cfg: JobConfig, validator: Validator | None, parts: list[nn.Module],
                 tokenizer: Tokenizer, template: ChatTemplate | None, device: torch.device,
                 log):
        """``parts``: this rank's model (or pipeline stages); the sample answers run on the
        first, which holds the whole model wherever sample prompts are allowed."""
        self.cfg, self.validator, self.parts = cfg, validator, parts
        self.tokenizer, self.template, self.device, self.log = tokenizer, template, device, log
        self.losses: dict[int, float] = {}  # step -> validation loss

    def due(self, step: int) -> bool:
        """After ``step`` (0: before training)? Every validation.interval steps and after the
        last one."""
        interval = self.cfg.validation.interval
        return step == self.cfg.training.steps or (interval > 0 and step % interval == 0)

    def run(self, step: int, metrics) -> float:
        """Validate (and answer the sample prompts) after ``step``; returns the seconds it took."""
        start = time.perf_counter()
        with evaluating(self.parts, self.device):
            if self.validator is not None:
                result = self.validator.run()
                self.losses[step] = result.loss
                metrics.log_validation(step, result.loss, result.perplexity, result.targets,
                                       time.perf_counter() - start)
            if self.cfg.validation.sample_prompts:
                when = "before training" if step == 0 else f"after step {step}"
                for line in sample_answers(self.parts[0], self.cfg, self.tokenizer,
                                           self.template, self.device):
                    self.log(f"sample {when}: {line}")
        return time.perf_counter() - start
