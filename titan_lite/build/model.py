"""Building the job's model: on the meta device with its fine-tuning transform, parallelised in
the fixed order (TP -> AC -> NF4 storage -> host placement -> FSDP -> materialise), checked to
fit, and loaded from ``model.init_from``; also the single-process model of a LoRA job for
generation and export."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.distributed.device_mesh import DeviceMesh

from titan_lite.checkpoint import is_checkpoint, load_model_weights
from titan_lite.config import JobConfig
from titan_lite.runtime.distributed import DTYPES, DistEnv
from titan_lite.finetune import (
    adapter_parameters,
    apply_lora,
    base_parameters,
    host_parameters,
    place_on_host,
    quantize_block_linears,
)
from titan_lite.hf import load_hf_weights
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.optim import trained_bytes_per_param
from titan_lite.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_lite.parallel.compile import apply_compile
from titan_lite.parallel.ddp import apply_ddp
from titan_lite.parallel.dims import ParallelDims
from titan_lite.parallel.fsdp import apply_fsdp
from titan_lite.parallel.init import materialize
from titan_lite.parallel.pp import Pipeline
from titan_lite.parallel.tp import apply_tp

class FitError(RuntimeError):
    """The configured model cannot fit on this device with the available parallelism."""


def available_memory_per_rank(device: torch.device, local_world_size: int) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    return info["MemAvailable"] // local_world_size


def check_model_fits(model: Transformer, cfg: JobConfig, dims: ParallelDims,
                     env: DistEnv) -> None:
    """Refuse up front a model whose sharded weights, gradients and AdamW states alone exceed
    the memory that holds them (host memory under CPU offload)."""
    offload = cfg.training.enable_cpu_offload
    shards = dims.state_shards(offload)
    on_host = set(host_parameters(model).values())
    trained = trained_bytes_per_param(cfg.optimizer)
    need = int(sum(p.numel() * (trained if p.requires_grad else p.element_size())
                   for p in model.parameters() if offload or p not in on_host) // shards)
    where = torch.device("cpu") if offload else env.device
    have = available_memory_per_rank(where, env.local_world_size)
    if need > have:
        raise FitError(f"model.flavor: {model.num_params() / 1e9:.2f}B parameters need "
                       f"{need / 2**30:.1f} GiB per rank for their weights (and the trained "
                       f"ones' gradients and AdamW states) split {shards} way(s) "
                       f"(before activations), but "
                       f"{'host memory' if offload else f'this {where.type} device'} has "
                       f"{have / 2**30:.1f} GiB per rank; shard over more ranks "
                       "(parallelism.dp_shard), turn on training.enable_cpu_offload, or pick a "
                       "smaller flavor")


def parallelize(model: Transformer, cfg: JobConfig, dims: ParallelDims, mesh: DeviceMesh | None,
                env: DistEnv, draw_weights: bool = True) -> torch.nn.Module:
    """Apply TP, activation checkpointing, QLoRA's NF4 storage, host placement (of a frozen
    embedding) and FSDP to a meta-device model (or pipeline stage), then allocate this rank's
    shards and draw the weights. Returns the module to call, which is ``model`` itself except
    under DDP."""
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], cfg.parallelism.enable_loss_parallel)
    apply_activation_checkpointing(model, cfg.activation_checkpoint)
    if cfg.training.compile:
        apply_compile(model)
    offload = cfg.training.enable_cpu_offload
    param_device = torch.device("cpu") if offload else env.device
    fsdp = dims.uses_fsdp(offload)
    if cfg.lora.quantize_base == "nf4":
        # FSDP2 moves an NF4 shard to the GPU only through its all-gather, which it skips with
        # one shard: then the block linears stream themselves from host memory
        quantize_block_linears(model, param_device, on_host=offload and dims.dp_shard == 1)
    host = place_on_host(model)
    if fsdp:
        apply_fsdp(model, mesh, cfg.training, cfg.parallelism, pipelined=dims.pp > 1,
                   ignored_params=set(host.values()))
    materialize(model, cfg.job.seed, env.device, param_device, draw_weights)
    if dims.dp_replicate > 1 and not fsdp:
        return apply_ddp(model, mesh, ignored=list(host))
    return model


def build_model(cfg: JobConfig, model: Transformer, dims: ParallelDims,
                mesh: DeviceMesh | None, env: DistEnv, draw_weights: bool = True
                ) -> tuple[list[Transformer], torch.nn.Module | Pipeline]:
    """Parallelise the meta-device ``model``: returns this rank's model parts (one, or its
    pipeline stages) and what runs a training step (the module to call, or the pipeline)."""
    if dims.pp > 1:
        pipeline = Pipeline(model, cfg.parallelism, mesh["pp"], env.device,
                            cfg.training.local_batch_size,
                            lambda stage: parallelize(stage, cfg, dims, mesh, env, draw_weights),
                            cfg.training.loss_chunks)
        return pipeline.parts, pipeline
    return [model], parallelize(model, cfg, dims, mesh, env, draw_weights)


def build_meta_model(cfg: JobConfig, args: ModelArgs) -> Transformer:
    """The job's model on the meta device, with the fine-tuning transform it asks for."""
    with torch.device("meta"):
        model = Transformer(args)
    lora = cfg.lora
    if lora.enable:
        apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.target_modules,
                   DTYPES[lora.base_dtype], DTYPES[cfg.training.mixed_precision_param],
                   lora.embedding_on_host)
    return model


def build_finetuned_model(cfg: JobConfig, args: ModelArgs, device: torch.device,
                          checkpoint: str | None) -> Transformer:
    """A LoRA job's model in this one process (for generation and export): its base as
    training builds it (model.init_from, else job.seed; quantised if the job quantises it),
    with the adapters of the titan_lite ``checkpoint`` folder (None: untrained adapters)."""
    single = replace(cfg, training=replace(cfg.training, enable_cpu_offload=False,
                                           compile=False),
                     activation_checkpoint=replace(cfg.activation_checkpoint, mode="none"))
    dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=1)
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1, device=device)
    parts, _ = build_model(single, build_meta_model(single, args), dims, None, env)
    if cfg.model.init_from:
        load_pretrained(parts, cfg.model.init_from, args)
    if checkpoint is not None:
        load_model_weights(parts, checkpoint, adapter_parameters)
    return parts[0].eval()


def load_pretrained(parts: list[Transformer], folder: str, args: ModelArgs) -> None:
    """Overwrite the initial weights with those in ``folder``: a Hugging Face checkpoint, or a
    titan_lite one (a training step-N, or one made by ``python -m titan_lite.hf import``).
    ``args`` is the job's (``job_model_args``, which checked a config.json against it)."""
    if is_checkpoint(folder):  # (shapes are checked by the load itself)
        load_model_weights(parts, folder, base_parameters)  # a LoRA model's adapters start new
    else:
        load_hf_weights(parts, folder, args)
