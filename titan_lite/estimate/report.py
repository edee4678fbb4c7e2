"""What ``--estimate`` prints (breakdown, closed form, verdict) and its command line."""

from __future__ import annotations

import os
import sys

import titan_lite.estimate as estimate_package
from titan_lite.build import check_job
from titan_lite.config import ConfigError, JobConfig, help_text, load_config
from titan_lite.estimate.gpus import ALLOCATOR_SLACK, CUDA_CONTEXT_GIB, GPUS
from titan_lite.estimate.planner import format_plan, plan
from titan_lite.estimate.trace import GIB, MemoryEstimate, estimate_memory, job_dims
from titan_lite.estimate.tracker import GRADS, LABELS, OPTIM, PARAMS
from titan_lite.optim import trained_bytes_per_param
from titan_lite.optim.compact import state_bytes_per_parameter


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
        lines.append("host memory of each rank at its peak:")
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
    traced = state[PARAMS] + state[GRADS] + state[OPTIM]
    line = (f"weights + gradients + AdamW states per rank: {state[PARAMS] / GIB:.3f} + "
            f"{state[GRADS] / GIB:.3f} + {state[OPTIM] / GIB:.3f} = {traced / GIB:.3f} GiB "
            "traced; ")
    trainable = estimate.trainable_params
    if trainable < estimate.num_params:  # LoRA: the frozen base has no gradients or states
        frozen = estimate.num_params - trainable
        return line + (f"{frozen:,} frozen base parameters at {state[PARAMS] * shards / frozen:.3f}"
                       f" B each (adapters included) + {trainable:,} trained x 4 B x (1 + 2) "
                       f"/ {shards} = {trainable * 12 / shards / GIB:.3f} GiB of gradients and "
                       "AdamW states")
    optimizer = estimate.cfg.optimizer
    formula = estimate.num_params * trained_bytes_per_param(optimizer) / shards
    grads = ("0 (optimizer.in_backward: each unit's gradients live until it steps)"
             if optimizer.in_backward else "4")
    return line + (f"closed form {estimate.num_params:,} x (4 + {grads} + "
                   f"{state_bytes_per_parameter(optimizer.state_dtype):g} "
                   f"[{optimizer.state_dtype} moments]) B / {shards} = "
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
        print(f"{estimate_package.__doc__}\nKeys (the [estimate] section and every training "
              f"key):\n{help_text()}")
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
    try:
        if cfg.estimate.plan:
            found = plan(cfg, num_gpus, capacity or 0.0, source,
                         log=lambda line: print(line, file=sys.stderr, flush=True))
            print(format_plan(found, cfg, num_gpus, capacity or 0.0, cfg.estimate.gpu))
            return
        print(format_estimate(estimate_memory(cfg, num_gpus), capacity, source))
    except ValueError as e:  # e.g. a tokenizer that is not model.init_from's (as training says)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
