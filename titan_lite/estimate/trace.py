"""Trace the trainer's own step on fake tensors over a fake process group: per-rank memory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining.schedules import ScheduleGPipe
from torch.testing._internal.distributed.fake_pg import FakeStore

from titan_lite.config import ConfigError, JobConfig
from titan_lite.data import Batch
from titan_lite.data.tokenizer import build_tokenizer
from titan_lite.runtime.distributed import DTYPES, DistEnv, local_shard
from titan_lite.estimate.gpus import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB
from titan_lite.estimate.tracker import (
    BUFFERS,
    COMM,
    GRADS,
    HOST_WEIGHTS,
    OFFLOADED,
    OPTIM,
    OPTIM_STEP,
    PARAMS,
    SAVED_ON_HOST,
    LabelledTracker,
)
from titan_lite.finetune import host_parameters
from titan_lite.loss import cross_entropy_sum
from titan_lite.hf.config import job_model_args
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.optim import LossScaler, build_optimizer
from titan_lite.optim.in_backward import StepInBackward
from titan_lite.parallel.dims import ParallelDims, build_mesh, resolve_degrees
from titan_lite.parallel.pp import Pipeline
from titan_lite.build import build_meta_model, build_model
from titan_lite.train import (
    StepRecipe,
    forward_backward,
    optimizer_step,
    resolve_auto_keys,
    step_recipe,
)

GIB = 2**30


@dataclass
class RankEstimate:
    rank: int
    total_peak: int  # device + host: what a CPU-only run measures
    device_peak: int
    device: dict[str, int]  # label -> bytes at the device peak
    host_peak: int
    host: dict[str, int]  # label -> bytes at the host peak
    state: dict[str, int]  # parameters, gradients and optimizer states after backward


@dataclass
class MemoryEstimate:
    """The estimate for the rank with the highest device peak (and the others' peaks)."""
    cfg: JobConfig
    num_gpus: int
    num_params: int
    worst: RankEstimate
    ranks: list[RankEstimate] = field(default_factory=list)
    trainable_params: int = 0  # the rest is a frozen base (LoRA)

    def required_gib(self) -> float:
        """Device memory to ask for: the traced peak plus the allowances it does not see."""
        return required_gib(self.worst.device_peak / GIB)


def required_gib(device_peak_gib: float) -> float:
    """Device memory to ask for with a traced peak of ``device_peak_gib``."""
    return device_peak_gib * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB


def model_args(cfg: JobConfig) -> ModelArgs:
    """The job's model as training builds it; without the tokenizer at hand, the vocabulary is
    model.init_from's config.json's, else the flavor's own."""
    tokenizer = None
    if os.path.exists(cfg.tokenizer.path):
        tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    return job_model_args(cfg.model.flavor, cfg.model.init_from, cfg.training.seq_len,
                          tokenizer)


def job_dims(cfg: JobConfig, num_gpus: int) -> ParallelDims:
    """The job's degrees on ``num_gpus`` ranks; ConfigError when they do not fit."""
    dims, problems = resolve_degrees(cfg.parallelism, num_gpus)
    if dims is None:
        raise ConfigError(problems)
    return dims


def estimate_memory(cfg: JobConfig, num_gpus: int, n_layers: int | None = None
                    ) -> MemoryEstimate:
    """Trace the job on ``num_gpus`` fake ranks; one rank per pipeline stage (else rank 0, which
    holds the largest shards when a dimension does not split evenly). ``n_layers``: trace the
    model with that many blocks instead (the planner's quick lower bound)."""
    dims = job_dims(cfg, num_gpus)
    args = model_args(cfg)
    if n_layers is not None:
        args = replace(args, n_layers=n_layers)
    cfg = resolve_auto_keys(cfg, dims, args.vocab_size)
    # traced eager: compiled kernels cannot run on fake tensors (Inductor's fusion only saves
    # some temporaries, so the eager peak is an upper bound)
    cfg = replace(cfg, training=replace(cfg.training, compile=False))
    traced_cfg, traced_world, ddp_buckets = cfg, num_gpus, False
    if dims.dp_replicate > 1 and not dims.uses_fsdp(cfg.training.enable_cpu_offload):
        # DDP replicas hold the same as one of them, plus DDP's gradient buckets (DDP's
        # construction broadcasts real weights, so it cannot run on fake tensors).
        traced_cfg = replace(cfg, parallelism=replace(cfg.parallelism, dp_replicate=1))
        traced_world, ddp_buckets = num_gpus // dims.dp_replicate, True
    ranks_per_stage = traced_world // dims.pp
    ranks = [_trace_rank(traced_cfg, args, traced_world, stage * ranks_per_stage, ddp_buckets)
             for stage in range(dims.pp)]
    model = build_meta_model(cfg, args)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    worst = max(ranks, key=lambda r: r.device_peak)
    return MemoryEstimate(cfg, num_gpus, model.num_params(), worst, ranks, trainable)


def _trace_rank(cfg: JobConfig, args: ModelArgs, world: int, rank: int,
                ddp_buckets: bool) -> RankEstimate:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        dims = job_dims(cfg, world)
        offload = cfg.training.enable_cpu_offload
        mesh = build_mesh(dims, "cpu", dims.uses_fsdp(offload))  # outside fake mode: real ranks
        env = DistEnv(rank, rank % 8, world, min(world, 8), torch.device("cpu"))
        model = build_meta_model(cfg, args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _trace_steps(cfg, args, dims, mesh, env, model, ddp_buckets)
    finally:
        dist.destroy_process_group()


def _trace_steps(cfg: JobConfig, args: ModelArgs, dims: ParallelDims, mesh: DeviceMesh | None,
                 env: DistEnv, model: Transformer, ddp_buckets: bool) -> RankEstimate:
    parts, runner = build_model(cfg, model, dims, mesh, env, draw_weights=False)
    modules = torch.nn.ModuleList(parts)
    params = list(modules.parameters())
    # fake tensors cannot be used by two threads: a step in backward runs on this one
    optimizer = build_optimizer(modules, cfg.optimizer, synchronous=True)
    recipe = step_recipe(cfg, dims, env.device)
    group = mesh["pp"].get_group() if dims.pp > 1 else None
    t = cfg.training
    # float16's loss scaling unscales gradients in place: nothing to trace
    no_scaling = LossScaler(enabled=False)

    def next_batch() -> Batch:
        tokens = torch.randint(0, args.vocab_size, (t.local_batch_size, t.seq_len + 1))
        return Batch(tokens[:, :-1], tokens[:, 1:])

    def step(tracker: LabelledTracker | None) -> None:
        traced = recipe if tracker is None else replace(  # offloaded: host memory
            recipe, on_offload=lambda copy: tracker.label([copy], SAVED_ON_HOST))
        if isinstance(runner, Pipeline):
            # FSDP computes in its param dtype; autocast keeps the residual stream in fp32
            hidden = (DTYPES[t.mixed_precision_param] if dims.uses_fsdp(t.enable_cpu_offload)
                      else torch.float32)
            outputs = _pipeline_step(runner, next_batch, recipe,
                                     env.rank // (env.world_size // dims.pp), hidden, received)
        else:
            outputs = forward_backward(runner, next_batch, env.device, traced, None,
                                       optimizer if isinstance(optimizer, StepInBackward)
                                       else None)
        if tracker is not None:
            tracker.phase = OPTIM_STEP
        optimizer_step(params, optimizer, t.max_norm, group, no_scaling)
        del outputs

    received: dict[tuple[str, int, int], torch.Tensor] = {}  # pipeline receive buffers
    step(None)  # creates the optimizer states; DTensor caches its sharding decisions
    tracker = LabelledTracker(OFFLOADED if t.enable_cpu_offload else ())
    tracker.label(params, PARAMS)
    tracker.label(host_parameters(modules).values(), HOST_WEIGHTS)
    tracker.label(modules.buffers(), BUFFERS)
    tracker.label(received.values(), COMM)
    tracker.label((s for state in optimizer.state.values() for s in state.values()), OPTIM)
    # DDP's flat gradient buckets (allocated when it wraps the model), alive for the trace
    buckets = [torch.empty(sum(p.numel() for p in params))] if ddp_buckets else []
    tracker.label(buckets, COMM)
    state = {PARAMS: tracker.live[PARAMS] + tracker.live[HOST_WEIGHTS],
             OPTIM: tracker.live[OPTIM]}
    grad_bytes: dict[int, int] = {}

    def on_grad(param: torch.Tensor) -> None:  # the gradient is assigned (or accumulated)
        if param.grad is not None:  # (a step in backward may have stepped and freed it)
            tracker.label([param.grad], GRADS)
        grad_bytes[id(param)] = local_shard(param).numel() * param.element_size()

    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in params if p.requires_grad]
    tracker.reset_peak()
    with tracker:
        step(tracker)
    for hook in hooks:
        hook.remove()
    # stepped in backward, a unit's gradients are freed as it steps: what is held at once
    state[GRADS] = (tracker.host_at_peak.get(GRADS, 0) if isinstance(optimizer, StepInBackward)
                    else sum(grad_bytes.values()))
    return RankEstimate(env.rank, tracker.peak_bytes, tracker.device_peak, tracker.device_at_peak,
                        tracker.host_peak, tracker.host_at_peak, state)


def _pipeline_step(pipeline: Pipeline, next_batch: Callable[[], tuple], recipe: StepRecipe,
                   pp_rank: int, hidden_dtype: torch.dtype,
                   received: dict[tuple[str, int, int], torch.Tensor]) -> list[torch.Tensor]:
    """One step of this rank's pipeline stages in the schedule's own order of forwards and
    backwards. A fake process group carries no data (nor the schedule's start-up handshake), so
    what the neighbours would send is a buffer of its shape, kept in ``received`` from one step
    to the next as the stages keep their receive buffers; FSDP stages keep unsharded gradients
    until the schedule's final reduction, as torch's PipelineStage does. Returns the last
    stage's outputs, which the schedule keeps (to return them) until its next step."""
    batch = next_batch()
    inputs, labels = batch.inputs, batch.labels
    count = pipeline.microbatches
    micro_inputs, micro_labels = inputs.chunk(count), labels.chunk(count)
    kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    last_outputs = []
    for kind, index, micro in _schedule_actions(pipeline, pp_rank):
        stage = pipeline.stages[index]
        if kind == "F":
            x = micro_inputs[micro]
            if index > 0:  # the previous stage's activations, received
                buffer = received.setdefault(("F", index, micro), torch.empty(
                    *x.shape, stage.submod.args.dim, dtype=hidden_dtype))
                x = buffer.detach().requires_grad_()
            with recipe.autocast:
                out = stage.submod(x)
            if index == pipeline.num_stages - 1:
                last_outputs.append(out)
                with recipe.loss_context():
                    out = cross_entropy_sum(out, micro_labels[micro],
                                            recipe.loss_chunks) / labels.numel()
            kept[index, micro] = (x, out)
        elif kind == "B":
            x, out = kept.pop((index, micro))
            if isinstance(stage.submod, FSDPModule):
                stage.submod.set_is_last_backward(False)
                stage.submod.set_reshard_after_backward(False)
                stage.submod.set_requires_gradient_sync(False)
            grad = None if out.ndim == 0 else received.setdefault(  # unless the last stage:
                ("B", index, micro), torch.empty_like(out))  # the next stage's gradient
            with recipe.loss_context():
                out.backward(grad)
            del x, out
        elif kind == "REDUCE_GRAD":
            stage.perform_reduce_grad(1)
        else:
            raise NotImplementedError(f"estimating pipeline action {kind}")
    return last_outputs


def _schedule_actions(pipeline: Pipeline, pp_rank: int) -> Iterator[tuple[str, int, Any]]:
    """(kind F/B/REDUCE_GRAD, stage index, micro-batch) in the order this rank runs them."""
    if len(pipeline.stages) > 1:  # multi-stage schedules publish their per-rank order
        for action in pipeline.schedule.pipeline_order[pp_rank]:
            if action is not None:
                yield (action.computation_type.value, action.stage_index,
                       action.microbatch_index)
        return
    (index,) = pipeline.stages
    count = pipeline.microbatches
    # GPipe: every forward, then every backward. 1F1B: as many forwards as stages remain
    # downstream (torch's warm-up), then one backward and one forward in turn.
    warmup = count if isinstance(pipeline.schedule, ScheduleGPipe) else min(
        count, pipeline.num_stages - index)
    yield from (("F", index, micro) for micro in range(warmup))
    for micro in range(count):
        yield "B", index, micro
        if warmup + micro < count:
            yield "F", index, warmup + micro
    yield "REDUCE_GRAD", index, None
