"""The planner's cost model: predicted seconds per step and GPU of a layout (an explained
ranking, not a promise of speed).

- compute: FLOPs of the step's tokens x (1 + recompute) / (GPU peak x ``ASSUMED_MFU``), where
  recompute is 0 (no AC), ``SELECTIVE_OP_RECOMPUTE`` (op-level: elementwise ops only), 1/3k
  (every k-th block: one more forward of those) or 1/3 (full: one more forward), plus kernel
  launches per micro-batch and block (``LAUNCH_SECONDS_PER_LAYER``: more, smaller
  micro-batches cost time);
- FSDP traffic: per micro-batch, all-gathers of the weights in the compute dtype for forward
  and backward plus a reduce-scatter of gradients in the reduce dtype, x (d-1)/d, and for
  replicas (DDP, HSDP) an all-reduce of the gradients (shards), over the GPU's peer bandwidth;
  overlapped with compute (the step takes the longer of the two);
- CPU offload: weights copied to the GPU per micro-batch and gradients back, over PCIe
  (``PCIE_GB_S``): overlapped with compute (the step takes the longest of compute, FSDP
  traffic and these copies) where FSDP2 makes them so, serial where it waits for them or
  where titan_lite streams an NF4 base on one shard per use (``offload_copies``); and the
  AdamW step on the host (``HOST_ADAM_PARAMS_PER_S``, slower with
  compact moments by ``HOST_STATE_SLOWDOWN``), after backward; with optimizer.in_backward
  the step overlaps the backward (2/3 of the step's compute, FSDP traffic or overlapped
  copies, whichever is longest) except the last unit's (the root:
  embeddings and output), which is stepped after it; full AC's activation offload copies the
  block inputs out and back on a side stream (overlapped);
- AdamW's state dtype without offload (on the GPU): no time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from titan_lite.build import build_meta_model
from titan_lite.config import JobConfig, load_config
from titan_lite.estimate.gpus import GPUS
from titan_lite.estimate.trace import job_dims, model_args
from titan_lite.finetune.lora import block_linears
from titan_lite.finetune.nf4 import BYTES_PER_WEIGHT as NF4_BYTES_PER_WEIGHT
from titan_lite.parallel.activation_checkpoint import checkpoint_every
from titan_lite.runtime.distributed import DTYPES
from titan_lite.runtime.metrics import gpu_peak_flops

ASSUMED_MFU = 0.4
LAUNCH_SECONDS_PER_LAYER = 3e-4  # ~30 kernels per block forward + backward, ~10 us each
SELECTIVE_OP_RECOMPUTE = 0.05
PCIE_GB_S = 25.0
HOST_ADAM_PARAMS_PER_S = 1e9
# host step time per parameter relative to float32 moments (bench/bench_optimizer.py speed,
# this 2-core CPU, 2026-12-06: float32 0.63, bfloat16 1.64, int8 20.6 s per billion)
HOST_STATE_SLOWDOWN = {"float32": 1.0, "bfloat16": 2.6, "int8": 33.0}


@dataclass(frozen=True)
class ModelStats:
    params: int
    trainable: int
    weight_bytes: float  # all weights at their storage size (a frozen base: bf16 or NF4)
    flops_per_token: int
    n_layers: int
    root_trainable: int  # trained outside the blocks (embeddings, final norm, output)
    dim: int
    vocab: int


def step_seconds(cfg: JobConfig, num_gpus: int, gpu: str) -> float:
    """Predicted seconds per optimizer step on ``gpu`` (see the module's cost model)."""
    dims = job_dims(cfg, num_gpus)
    t = cfg.training
    stats = model_stats(cfg)
    micro_batches = (1 if t.global_batch_size == -1
                     else t.global_batch_size // (t.local_batch_size * dims.dp))
    tokens = t.local_batch_size * t.seq_len * micro_batches  # this rank's data-parallel share
    peak = gpu_peak_flops(gpu, DTYPES[t.mixed_precision_param]) or 1e14
    launches = micro_batches * stats.n_layers * LAUNCH_SECONDS_PER_LAYER
    # loss slices recompute the output projection in backward: one more forward of it
    output_flops = 2 * stats.dim * stats.vocab if t.loss_chunks != 1 else 0
    split = dims.tp * dims.pp
    compute = tokens * (stats.flops_per_token * (1 + _recompute(cfg)) + output_flops) / (
        split * peak * ASSUMED_MFU) + launches
    trainable = stats.trainable / split
    # what one all-gather moves: trained weights in the compute dtype, a frozen base as stored
    frozen_bytes = (stats.weight_bytes - 4 * stats.trainable) / split
    gathered = trainable * _dtype_bytes(t.mixed_precision_param) + frozen_bytes
    communication = 0.0
    if dims.dp_shard > 1 and uses_fsdp(cfg, num_gpus):
        per_micro = 2 * gathered + trainable * _dtype_bytes(t.mixed_precision_reduce)
        communication = micro_batches * per_micro * (dims.dp_shard - 1) / dims.dp_shard
    if dims.dp_replicate > 1:  # DDP, or HSDP's all-reduce of the gradient shards
        shards = dims.dp_shard if uses_fsdp(cfg, num_gpus) else 1
        communication += (trainable / shards * 2 * _dtype_bytes(t.mixed_precision_reduce)
                          * (dims.dp_replicate - 1) / dims.dp_replicate)
    communication /= GPUS[gpu].link_gb_s * 1e9
    overlapped, serial, host_step = 0.0, 0.0, 0.0  # bytes over PCIe, and seconds
    if t.enable_cpu_offload:
        shards = max(dims.dp_shard, 1)
        overlapped, serial = offload_copies(cfg, micro_batches, trainable, frozen_bytes, shards)
        host_step = (trainable / shards / HOST_ADAM_PARAMS_PER_S
                     * HOST_STATE_SLOWDOWN[cfg.optimizer.state_dtype])
    if cfg.activation_checkpoint.offload:  # full AC's block inputs (bf16), on a side stream
        overlapped += 2 * tokens * stats.dim * 2 * stats.n_layers / split
    pcie = PCIE_GB_S * 1e9
    busy = max(compute, communication, overlapped / pcie)
    if cfg.optimizer.in_backward:  # hidden behind backward (2/3 of it), but the root unit's
        root_share = stats.root_trainable / max(stats.trainable, 1)
        host_step = max(host_step * root_share, host_step - busy * 2 / 3)
    return busy + serial / pcie + host_step


def offload_copies(cfg: JobConfig, micro_batches: int, trainable: float, frozen_bytes: float,
                    shards: int) -> tuple[float, float]:
    """Bytes CPU offload copies over PCIe per step: (overlapped with compute, not).

    In: the weights per micro-batch, for forward and backward. FSDP2 copies them in its
    all-gather stream ahead of use (overlapped); an NF4 base on one shard is titan_lite's own
    copy on the compute stream, per use (also AC's recomputation: serial). Out: the float32
    gradients per reduction. FSDP2's copy is asynchronous unless the gradient adds to one
    already there (accumulation) or a hook reads it at once (the step in backward): then the
    CPU waits for it and the GPU's queue runs dry (serial; torch 2.13's
    ``_fsdp_collectives.foreach_reduce``)."""
    streams = cfg.lora.quantize_base == "nf4" and shards == 1
    weights = micro_batches * (2 * 4 * trainable + (0 if streams else 2 * frozen_bytes))
    streamed = micro_batches * (2 + 3 * _recompute(cfg)) * frozen_bytes if streams else 0.0
    reductions = (micro_batches if cfg.parallelism.fsdp_reduce_every_microbatch
                  or micro_batches == 1 else 1)
    waited = reductions if cfg.optimizer.in_backward else reductions - 1
    gradients = 4 * trainable
    return ((weights + (reductions - waited) * gradients) / shards,
            (streamed + waited * gradients) / shards)


def _recompute(cfg: JobConfig) -> float:
    ac = cfg.activation_checkpoint
    if ac.mode == "full":
        return 1 / 3
    if ac.mode == "selective":
        every = checkpoint_every(ac.selective_ac_option)
        return SELECTIVE_OP_RECOMPUTE if every is None else 1 / (3 * every)
    return 0.0


def uses_fsdp(cfg: JobConfig, num_gpus: int) -> bool:
    """Whether the job shards with FSDP2 on ``num_gpus`` ranks (CPU offload does, also on one)."""
    dims = job_dims(cfg, num_gpus)
    return dims.uses_fsdp(cfg.training.enable_cpu_offload)


def _dtype_bytes(dtype_name: str) -> int:
    return DTYPES[dtype_name].itemsize


def model_stats(cfg: JobConfig) -> ModelStats:
    """Parameter counts, weight bytes and FLOPs per token of the job's model (and method)."""
    lora = cfg.lora
    return _stats(cfg.model.flavor, cfg.model.init_from, cfg.tokenizer.kind, cfg.tokenizer.path,
                  cfg.training.seq_len, (lora.enable, lora.rank, tuple(lora.target_modules),
                                         lora.base_dtype, lora.quantize_base))


@functools.cache
def _stats(flavor: str, init_from: str, kind: str, path: str, seq_len: int, lora: tuple
           ) -> ModelStats:
    enable, rank, targets, base_dtype, quantize = lora
    cfg = load_config(["--model.flavor", flavor, "--model.init_from", init_from,
                       "--tokenizer.kind", kind, "--tokenizer.path",
                       path, "--training.seq_len", str(seq_len), "--lora.enable", str(enable),
                       "--lora.rank", str(rank), "--lora.target_modules", ",".join(targets),
                       "--lora.base_dtype", base_dtype, "--lora.quantize_base", quantize])
    model = build_meta_model(cfg, model_args(cfg))
    quantized = {id(m.weight) for _, m in block_linears([model])} if quantize == "nf4" else set()
    weight_bytes = sum(p.numel() * (NF4_BYTES_PER_WEIGHT if id(p) in quantized
                                    else p.element_size()) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    root = sum(p.numel() for name, p in model.named_parameters()
               if p.requires_grad and not name.startswith("layers."))
    return ModelStats(model.num_params(), trainable, weight_bytes,
                      model.flops_per_token(seq_len), model.args.n_layers, root,
                      model.args.dim, model.args.vocab_size)
