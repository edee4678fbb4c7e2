"""Pipeline parallel over the ``pp`` mesh dim: split the blocks into stages, run a schedule.

The meta-device model is copied once per stage this rank holds; each copy keeps its own blocks
(names unchanged: ``layers.<i>``), the embedding only on the first stage and the final norm and
output only on the last. Each stage is then parallelised (TP, AC, FSDP) and materialised like a
whole model, and ``torch.distributed.pipelining`` moves activations between stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import DeviceMesh

from titan_lite.config import Parallelism, Training
from titan_lite.data import Batch
from titan_lite.loss import cross_entropy_sum
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.parallel.dims import ParallelDims

SCHEDULES = {"GPipe": "ScheduleGPipe", "1F1B": "Schedule1F1B",
             "Interleaved1F1B": "ScheduleInterleaved1F1B"}  # torch.distributed.pipelining's
MULTI_STAGE = {"Interleaved1F1B"}  # schedules that run several stages per rank


def stage_layers(n_layers: int, cfg: Parallelism, pp_degree: int) -> list[list[int]]:
    """The block indices of every stage, in order; ValueError names the key that is wrong."""
    if cfg.pipeline_parallel_split_points:
        bounds = _split_point_bounds(n_layers, cfg.pipeline_parallel_split_points)
    else:
        bounds = _even_bounds(n_layers, cfg, pp_degree)
    count = len(bounds) - 1
    if count % pp_degree:
        raise ValueError(f"parallelism.pipeline_parallel_degree: {count} stages cannot be "
                         f"spread evenly over {pp_degree} pipeline ranks")
    if count > pp_degree and cfg.pipeline_parallel_schedule not in MULTI_STAGE:
        raise ValueError(f"parallelism.pipeline_parallel_schedule: "
                         f"{cfg.pipeline_parallel_schedule} runs one stage per rank, but the "
                         f"split gives {count} stages for {pp_degree} ranks (use "
                         "Interleaved1F1B)")
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def _split_point_bounds(n_layers: int, points: list[str]) -> list[int]:
    bounds = [0]
    for point in points:
        number = point.removeprefix("layers.")
        index = int(number) if number.isdigit() else -1
        if not bounds[-1] < index < n_layers:
            raise ValueError(f"parallelism.pipeline_parallel_split_points: {point!r} is not a "
                             f"block 'layers.<i>' with 0 < i < {n_layers}, after the "
                             "previous split point")
        bounds.append(index)
    return [*bounds, n_layers]


def _even_bounds(n_layers: int, cfg: Parallelism, pp_degree: int) -> list[int]:
    per_stage = cfg.pipeline_parallel_layers_per_stage
    if per_stage > 0:
        if n_layers % per_stage:
            raise ValueError(f"parallelism.pipeline_parallel_layers_per_stage: {per_stage} "
                             f"does not divide the model's {n_layers} layers")
        count = n_layers // per_stage
    else:
        count = pp_degree * (2 if cfg.pipeline_parallel_schedule in MULTI_STAGE else 1)
    if count > n_layers:
        raise ValueError(f"parallelism.pipeline_parallel_degree: {count} stages need at least "
                         f"{count} layers; the model has {n_layers}")
    # The first stages take one more block when the split is not even.
    sizes = [n_layers // count + (i < n_layers % count) for i in range(count)]
    return [sum(sizes[:i]) for i in range(count + 1)]


def pp_problems(args: ModelArgs, cfg: Parallelism, training: Training,
                dims: ParallelDims) -> list[str]:
    """Why this pipeline layout cannot run (empty when it can)."""
    problems = []
    try:
        stage_layers(args.n_layers, cfg, dims.pp)
    except ValueError as e:
        problems.append(str(e))
    if training.local_batch_size % cfg.pipeline_parallel_microbatch_size:
        problems.append(f"parallelism.pipeline_parallel_microbatch_size: "
                        f"{cfg.pipeline_parallel_microbatch_size} does not divide "
                        f"training.local_batch_size ({training.local_batch_size})")
    if training.global_batch_size not in (-1, training.local_batch_size * dims.dp):
        problems.append("training.global_batch_size: gradient accumulation is not supported with "
                        "pipeline parallel; raise training.local_batch_size instead (the "
                        "pipeline already splits it into micro-batches)")
    if args.tie_word_embeddings:
        problems.append("parallelism.pipeline_parallel_degree: tied input/output embeddings "
                        "(1B, 3B) cannot be split across pipeline stages yet")
    return problems


def split_stage(model: Transformer, layers: list[int], first: bool, last: bool) -> Transformer:
    """A copy of the meta-device ``model`` holding only one stage's modules."""
    with unset_fake_temporarily():  # a plain meta copy, also while the estimator traces
        stage = copy.deepcopy(model)
    keep = {str(i) for i in layers}
    for key in list(stage.layers):
        if key not in keep:
            del stage.layers[key]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = None
        stage.output = None
    return stage


class Pipeline:
    """This rank's stages and the schedule that runs them for one optimizer step."""

    def __init__(self, model: Transformer, cfg: Parallelism, pp_mesh: DeviceMesh,
                 device: torch.device, local_batch_size: int,
                 prepare_stage: Callable[[Transformer], torch.nn.Module], loss_chunks: int = 1):
        """``prepare_stage`` parallelises and materialises one stage's meta-device model;
        ``loss_chunks``: see ``cross_entropy_sum``."""
        # imported here: torch.distributed.pipelining (and the torch._dynamo it imports) adds
        # ~1 s to every process's start-up, and only pipeline-parallel jobs need it
        from torch.distributed import pipelining

        self.loss_chunks = loss_chunks
        stages = stage_layers(model.args.n_layers, cfg, pp_mesh.size())
        rank, size = pp_mesh.get_local_rank(), pp_mesh.size()
        indices = list(range(rank, len(stages), size))  # round-robin ("loop") placement
        self.parts: list[Transformer] = []
        pipeline_stages = []
        for index in indices:
            part = split_stage(model, stages[index], index == 0, index == len(stages) - 1)
            self.parts.append(part)
            pipeline_stages.append(pipelining.PipelineStage(
                prepare_stage(part), index, len(stages), device, group=pp_mesh.get_group()))
        self.stages = dict(zip(indices, pipeline_stages))  # stage index -> PipelineStage
        self.is_first = 0 in indices
        self.is_last = len(stages) - 1 in indices
        self.num_stages = len(stages)
        self.microbatches = microbatches = local_batch_size // cfg.pipeline_parallel_microbatch_size
        schedules = pipelining.schedules
        schedule_cls = getattr(schedules, SCHEDULES[cfg.pipeline_parallel_schedule])
        # The loss is normalised by the global batch's target count (titan_lite.loss), not by
        # the number of micro-batches.
        self.loss_scale: torch.Tensor | float = 1.0
        self.schedule = schedule_cls(
            pipeline_stages if issubclass(schedule_cls, schedules.PipelineScheduleMulti)
            else pipeline_stages[0], n_microbatches=microbatches, loss_fn=self._loss,
            scale_grads=False)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, labels, self.loss_chunks) * self.loss_scale

    def _run(self, batch: Batch, forward_only: bool) -> torch.Tensor:
        losses: list[torch.Tensor] = []
        target = batch.labels if self.is_last else None
        args = (batch.inputs,) if self.is_first else ()
        # every stage takes the positions (packed samples), split into micro-batches alike
        run = self.schedule.eval if forward_only else self.schedule.step
        run(*args, target=target, losses=losses, **batch.model_kwargs())
        if not self.is_last:
            return torch.zeros((), device=batch.labels.device)
        return torch.stack([loss.detach() for loss in losses]).sum()

    def step(self, batch: Batch, loss_scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one batch through all stages, the loss being the summed
        cross entropy times ``loss_scale``. Returns that loss on the rank holding the last
        stage, 0 elsewhere."""
        self.loss_scale = loss_scale
        return self._run(batch, forward_only=False)

    def evaluate(self, batch: Batch) -> torch.Tensor:
        """Forward only: the batch's summed cross entropy on the last stage's rank, else 0."""
        self.loss_scale = 1.0
        return self._run(batch, forward_only=True)
