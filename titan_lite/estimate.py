"""Will it fit? Per-rank peak memory of a training step, traced without the memory or the GPUs.

``python -m titan_lite.estimate --config JOB.toml [--estimate.num_gpus N] [--estimate.gpu H100]
[--estimate.plan true]`` (or ``./run_train.sh ... --estimate``) builds the configured model and
layout for N ranks and runs real training steps of this trainer on fake tensors
(``FakeTensorMode``: shapes, dtypes and storages, no data) over a fake process group standing
in for rank 0 (and one rank per pipeline stage). A dispatch-mode tracker labels every storage
(parameters, gradients, optimizer states, gathered parameters, activations, ...) and records
the breakdown at the moment device memory peaks. The first step runs untracked (it creates the
optimizer states and fills DTensor's sharding caches, whose fake tensors are not memory); the
second is measured, as the trainer's own peak is. The same tracker measures real CPU runs, so
estimate and measurement count the same bytes (``bench/estimate_accuracy.py``).

Under CPU offload the sharded parameters, gradients and optimizer states (and the optimizer
step's temporaries) are host memory; everything else is device memory. Not counted: the CUDA
context, NCCL and cuBLAS workspaces and allocator fragmentation, which the fit verdict adds as
an allowance (``CUDA_CONTEXT_GIB``, ``ALLOCATOR_SLACK``).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining.schedules import ScheduleGPipe
from torch.testing._internal.distributed.fake_pg import FakeStore

from titan_lite.config import ConfigError, JobConfig, check_job, help_text, load_config
from titan_lite.distributed import DTYPES, DistEnv, local_shard
from titan_lite.memory import TensorMemoryTracker
from titan_lite.models.llama3 import FLAVORS, ModelArgs, Transformer
from titan_lite.optim import build_optimizer
from titan_lite.parallel.dims import ParallelDims, build_mesh, resolve_degrees
from titan_lite.parallel.pp import Pipeline, cross_entropy
from titan_lite.train import (
    BYTES_PER_PARAM,
    StepRecipe,
    build_model,
    forward_backward,
    optimizer_step,
    step_recipe,
)

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    memory_gib: float  # total memory as torch.cuda reports it
    link_gb_s: float  # per-GPU bandwidth to its peers (NVLink, else PCIe)


GPUS = {
    "H200": Gpu(140.4, 450), "H100": Gpu(79.2, 450), "H100 PCIe": Gpu(79.2, 64),
    "A100-80GB": Gpu(79.2, 300), "A100-40GB": Gpu(39.6, 300), "L40S": Gpu(44.4, 32),
    "A10G": Gpu(22.2, 16), "L4": Gpu(22.0, 16), "RTX 4090": Gpu(23.6, 32),
    "RTX 3090": Gpu(23.7, 32), "V100": Gpu(31.7, 150),
}
CUDA_CONTEXT_GIB = 1.0  # CUDA context + NCCL/cuBLAS workspaces, outside the allocator's count
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation allowance on top of the traced peak

PARAMS, GRADS, OPTIM = "parameters", "gradients", "optimizer states"
BUFFERS, GATHERED, COMM = "buffers", "gathered parameters", "communication buffers"
ACTIVATIONS, BACKWARD, OPTIM_STEP = "activations", "backward temporaries", "optimizer step"
LABELS = (PARAMS, GRADS, OPTIM, BUFFERS, GATHERED, COMM, ACTIVATIONS, BACKWARD, OPTIM_STEP)
OFFLOADED = (PARAMS, GRADS, OPTIM, OPTIM_STEP)  # host memory under CPU offload


class LabelledTracker(TensorMemoryTracker):
    """TensorMemoryTracker that labels each storage and keeps the per-label breakdown at the
    device peak and at the host peak (host = the ``host_labels``, e.g. offloaded state)."""

    def __init__(self, host_labels: Iterable[str] = ()) -> None:
        super().__init__()
        self.phase = ACTIVATIONS  # the label of storages created outside backward
        self.host_labels = frozenset(host_labels)
        self._labels: dict[int, str] = {}
        self.live: Counter[str] = Counter()
        self.device_peak, self.host_peak = 0, 0
        self.device_at_peak: dict[str, int] = {}
        self.host_at_peak: dict[str, int] = {}

    def label(self, tensors: Iterable[torch.Tensor | None], name: str) -> None:
        """Count ``tensors`` (DTensors: their shard) under ``name`` from now on."""
        for tensor in tensors:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = local_shard(tensor).untyped_storage()
            key = storage._cdata
            if key not in self._sizes:
                self._labels[key] = name
                self._count(storage)
            elif self._labels[key] != name:
                size = self._sizes[key]
                self.live[self._labels[key]] -= size
                self.live[name] += size
                self._labels[key] = name
                self._update_peaks()

    def reset_peak(self) -> None:
        super().reset_peak()
        self.device_peak = self.host_peak = 0
        self._update_peaks()

    def _on_new(self, key: int, origin: Any) -> None:
        if key in self._labels:
            return
        if origin == "resize_":  # FSDP2 re-allocates unsharded parameters by resizing
            self._labels[key] = GATHERED
        elif getattr(origin, "namespace", "") in ("c10d", "_c10d_functional", "fsdp"):
            self._labels[key] = COMM
        elif torch._C._current_graph_task_id() != -1:  # inside autograd's backward pass
            self._labels[key] = BACKWARD  # gradients are relabelled by a hook when assigned
        else:
            self._labels[key] = self.phase

    def _change(self, key: int, delta: int) -> None:
        super()._change(key, delta)
        self.live[self._labels[key]] += delta
        self._update_peaks()

    def _forget(self, key: int, ref: Any) -> None:
        super()._forget(key, ref)
        self._labels.pop(key, None)

    def _update_peaks(self) -> None:
        host = sum(self.live[label] for label in self.host_labels)
        if self.live_bytes - host > self.device_peak:
            self.device_peak = self.live_bytes - host
            self.device_at_peak = {k: v for k, v in self.live.items()
                                   if k not in self.host_labels}
        if host > self.host_peak:
            self.host_peak = host
            self.host_at_peak = {k: self.live[k] for k in self.host_labels}


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

    def required_gib(self) -> float:
        """Device memory to ask for: the traced peak plus the allowances it does not see."""
        return self.worst.device_peak / GIB * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_GIB


def model_args(cfg: JobConfig) -> ModelArgs:
    """The flavor with the tokenizer's vocab when its file is at hand, else the flavor's own."""
    args = FLAVORS[cfg.model.flavor]
    if os.path.exists(cfg.tokenizer.path):
        from titan_lite.tokenizer import build_tokenizer

        args = args.with_vocab(build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
                               .vocab_size)
    return replace(args, max_seq_len=cfg.training.seq_len)


def job_dims(cfg: JobConfig, num_gpus: int) -> ParallelDims:
    """The job's degrees on ``num_gpus`` ranks; ConfigError when they do not fit."""
    dims, problems = resolve_degrees(cfg.parallelism, num_gpus)
    if dims is None:
        raise ConfigError(problems)
    return dims


def estimate_memory(cfg: JobConfig, num_gpus: int) -> MemoryEstimate:
    """Trace the job on ``num_gpus`` fake ranks; one rank per pipeline stage (else rank 0, which
    holds the largest shards when a dimension does not split evenly)."""
    dims = job_dims(cfg, num_gpus)
    args = model_args(cfg)
    traced_cfg, traced_world, ddp_buckets = cfg, num_gpus, False
    if dims.dp_replicate > 1 and not dims.uses_fsdp(cfg.training.enable_cpu_offload):
        # DDP replicas hold the same as one of them, plus DDP's gradient buckets (DDP's
        # construction broadcasts real weights, so it cannot run on fake tensors).
        traced_cfg = replace(cfg, parallelism=replace(cfg.parallelism, dp_replicate=1))
        traced_world, ddp_buckets = num_gpus // dims.dp_replicate, True
    ranks_per_stage = traced_world // dims.pp
    ranks = [_trace_rank(traced_cfg, args, traced_world, stage * ranks_per_stage, ddp_buckets)
             for stage in range(dims.pp)]
    with torch.device("meta"):
        num_params = Transformer(args).num_params()
    worst = max(ranks, key=lambda r: r.device_peak)
    return MemoryEstimate(cfg, num_gpus, num_params, worst, ranks)


def _trace_rank(cfg: JobConfig, args: ModelArgs, world: int, rank: int,
                ddp_buckets: bool) -> RankEstimate:
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        dims = job_dims(cfg, world)
        offload = cfg.training.enable_cpu_offload
        mesh = build_mesh(dims, "cpu", dims.uses_fsdp(offload))  # outside fake mode: real ranks
        env = DistEnv(rank, rank % 8, world, min(world, 8), torch.device("cpu"))
        with torch.device("meta"):
            model = Transformer(args)
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _trace_steps(cfg, args, dims, mesh, env, model, ddp_buckets)
    finally:
        dist.destroy_process_group()


def _trace_steps(cfg: JobConfig, args: ModelArgs, dims: ParallelDims, mesh: DeviceMesh | None,
                 env: DistEnv, model: Transformer, ddp_buckets: bool) -> RankEstimate:
    parts, runner = build_model(cfg, model, dims, mesh, env, draw_weights=False)
    modules = torch.nn.ModuleList(parts)
    params = list(modules.parameters())
    optimizer = build_optimizer(modules, cfg.optimizer)
    recipe = step_recipe(cfg, dims, env.device)
    group = mesh["pp"].get_group() if dims.pp > 1 else None
    t = cfg.training

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(0, args.vocab_size, (t.local_batch_size, t.seq_len + 1))
        return tokens[:, :-1], tokens[:, 1:]

    def step(tracker: LabelledTracker | None) -> None:
        if isinstance(runner, Pipeline):
            # FSDP computes in its param dtype; autocast keeps the residual stream in fp32
            hidden = (DTYPES[t.mixed_precision_param] if dims.uses_fsdp(t.enable_cpu_offload)
                      else torch.float32)
            outputs = _pipeline_step(runner, next_batch, recipe,
                                     env.rank // (env.world_size // dims.pp), hidden, received)
        else:
            outputs = forward_backward(runner, next_batch, env.device, recipe)
        if tracker is not None:
            tracker.phase = OPTIM_STEP
        optimizer_step(params, optimizer, t.max_norm, group)
        del outputs

    received: dict[tuple[str, int, int], torch.Tensor] = {}  # pipeline receive buffers
    step(None)  # creates the optimizer states; DTensor caches its sharding decisions
    tracker = LabelledTracker(OFFLOADED if t.enable_cpu_offload else ())
    tracker.label(params, PARAMS)
    tracker.label(modules.buffers(), BUFFERS)
    tracker.label(received.values(), COMM)
    tracker.label((s for state in optimizer.state.values() for s in state.values()), OPTIM)
    # DDP's flat gradient buckets (allocated when it wraps the model), alive for the trace
    buckets = [torch.empty(sum(p.numel() for p in params))] if ddp_buckets else []
    tracker.label(buckets, COMM)
    state = {PARAMS: tracker.live[PARAMS], OPTIM: tracker.live[OPTIM]}
    grad_bytes: dict[int, int] = {}

    def on_grad(param: torch.Tensor) -> None:  # the gradient is assigned (or accumulated)
        tracker.label([param.grad], GRADS)
        grad_bytes[id(param)] = local_shard(param.grad).numel() * param.grad.element_size()

    hooks = [p.register_post_accumulate_grad_hook(on_grad) for p in params]
    tracker.reset_peak()
    with tracker:
        step(tracker)
    for hook in hooks:
        hook.remove()
    state[GRADS] = sum(grad_bytes.values())
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
    inputs, labels = next_batch()
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
                    out = cross_entropy(out, micro_labels[micro]) / count
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


def describe_job(cfg: JobConfig, num_gpus: int) -> str:
    t, ac = cfg.training, cfg.activation_checkpoint
    dims = job_dims(cfg, num_gpus)
    layout = " x ".join(f"{name} {size}" for name, size in (
        ("replicas", dims.dp_replicate), ("FSDP", dims.dp_shard), ("TP", dims.tp),
        ("PP", dims.pp)) if size > 1) or "one rank"
    if dims.uses_fsdp(t.enable_cpu_offload) and dims.dp_shard == 1:
        layout += " (FSDP for offload)"
    ac_text = ac.mode + (f" ({ac.selective_ac_option})" if ac.mode == "selective" else "")
    batch = t.local_batch_size * dims.dp
    accumulation = 1 if t.global_batch_size == -1 else t.global_batch_size // batch
    return (f"{num_gpus} rank(s): {layout} | compute {t.mixed_precision_param}, reduce "
            f"{t.mixed_precision_reduce} | AC {ac_text} | CPU offload "
            f"{'on' if t.enable_cpu_offload else 'off'} | local batch {t.local_batch_size} x "
            f"{t.seq_len}, {accumulation} micro-batch(es) per step")


def format_estimate(estimate: MemoryEstimate, capacity_gib: float | None,
                    capacity_source: str) -> str:
    """The report ``--estimate`` prints: breakdown at the peak, closed form, verdict."""
    cfg, worst = estimate.cfg, estimate.worst
    lines = [f"llama3 {cfg.model.flavor}: {estimate.num_params:,} parameters | "
             f"{describe_job(cfg, estimate.num_gpus)}"]
    if len(estimate.ranks) > 1:
        lines.append("pipeline stages' peaks: " + ", ".join(
            f"rank {r.rank} {r.device_peak / GIB:.2f} GiB" for r in estimate.ranks))
    lines.append(f"device memory of rank {worst.rank} at its peak:")
    lines += _table(worst.device, worst.device_peak, "traced peak")
    if worst.host_peak:
        lines.append("host memory of each rank (CPU offload) at its peak:")
        lines += _table(worst.host, worst.host_peak, "host peak")
    lines.append(closed_form_line(estimate))
    required = estimate.required_gib()
    if capacity_gib:
        verdict = "FITS" if required <= capacity_gib else "DOES NOT FIT"
        lines.append(f"{verdict} on {capacity_source} ({capacity_gib:.1f} GiB): needs "
                     f"{required:.2f} GiB = traced peak x {1 + ALLOCATOR_SLACK:.2f} + "
                     f"{CUDA_CONTEXT_GIB:.1f} GiB CUDA context; margin "
                     f"{capacity_gib - required:+.2f} GiB")
    else:
        lines.append(f"needs {required:.2f} GiB per GPU (traced peak x {1 + ALLOCATOR_SLACK:.2f}"
                     f" + {CUDA_CONTEXT_GIB:.1f} GiB CUDA context); give --estimate.gpu or "
                     "--estimate.device_memory_gb for a verdict")
    return "\n".join(lines)


def _table(breakdown: dict[str, int], total: int, total_name: str) -> list[str]:
    rows = [f"  {label:<24}{breakdown[label] / GIB:>9.3f} GiB" for label in LABELS
            if breakdown.get(label)]
    return rows + [f"  {total_name:<24}{total / GIB:>9.3f} GiB"]


def closed_form_line(estimate: MemoryEstimate) -> str:
    """The traced weights, gradients and AdamW states next to the published arithmetic."""
    state, dims = estimate.worst.state, job_dims(estimate.cfg, estimate.num_gpus)
    shards = dims.state_shards(estimate.cfg.training.enable_cpu_offload)
    formula = estimate.num_params * BYTES_PER_PARAM / shards
    traced = state[PARAMS] + state[GRADS] + state[OPTIM]
    return (f"weights + gradients + AdamW states per rank: {state[PARAMS] / GIB:.3f} + "
            f"{state[GRADS] / GIB:.3f} + {state[OPTIM] / GIB:.3f} = {traced / GIB:.3f} GiB traced; "
            f"closed form {estimate.num_params:,} x 4 B x (1 + 1 + 2) / {shards} = "
            f"{formula / GIB:.3f} GiB ({formula / 1e9:.2f} GB)")


def device_capacity(cfg: JobConfig) -> tuple[float | None, str]:
    """(GiB per GPU, where that came from) from estimate.device_memory_gb or estimate.gpu."""
    if cfg.estimate.device_memory_gb:
        return cfg.estimate.device_memory_gb, "estimate.device_memory_gb"
    if cfg.estimate.gpu:
        return GPUS[cfg.estimate.gpu].memory_gib, cfg.estimate.gpu
    return None, ""


def estimate_problems(cfg: JobConfig) -> list[str]:
    if cfg.estimate.gpu and cfg.estimate.gpu not in GPUS:
        return [f"estimate.gpu: unknown GPU {cfg.estimate.gpu!r}; known: "
                f"{', '.join(GPUS)} (or give estimate.device_memory_gb)"]
    if cfg.estimate.plan and not (cfg.estimate.gpu or cfg.estimate.device_memory_gb):
        return ["estimate.plan: needs estimate.gpu or estimate.device_memory_gb to plan for"]
    return []


def num_gpus_of(cfg: JobConfig) -> int:
    return cfg.estimate.num_gpus or int(os.environ.get("WORLD_SIZE", "1"))


def main(argv: list[str] | None = None) -> None:
    """``python -m titan_lite.estimate --config JOB.toml [--estimate.* ...] [overrides]``"""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(f"{__doc__}\nKeys (the [estimate] section and every training key):\n"
              f"{help_text()}")
        return
    try:
        cfg = load_config(argv)
        num_gpus = num_gpus_of(cfg)
        problems = estimate_problems(cfg) + check_job(cfg, num_gpus, training_here=False)
        if problems:
            raise ConfigError(problems)
    except ConfigError as e:
        for problem in e.problems:
            print(f"config error: {problem}", file=sys.stderr)
        sys.exit(2)
    capacity, source = device_capacity(cfg)
    if cfg.estimate.plan:
        from titan_lite.planner import format_plan, plan

        print(format_plan(plan(cfg, num_gpus, capacity or 0.0, source), cfg, num_gpus,
                          capacity or 0.0, cfg.estimate.gpu))
        return
    print(format_estimate(estimate_memory(cfg, num_gpus), capacity, source))


if __name__ == "__main__":
    main()
