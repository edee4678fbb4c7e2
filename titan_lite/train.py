"""The training loop. Run under torchrun:

    torchrun --standalone --nproc_per_node=1 -m titan_lite.train \
        --config train_configs/debug_model.toml
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from titan_lite import USER_INDUCTOR_CACHE_DIR
from titan_lite.build import (
    FitError,
    build_meta_model,
    build_model,
    check_model_fits,
    load_pretrained,
    parse_or_exit,
)
from titan_lite.checkpoint import Checkpointer, CheckpointError, Preemption
from titan_lite.config import JobConfig
from titan_lite.data import Batch, Data, build_chat_template, build_data
from titan_lite.runtime.distributed import (
    DTYPES,
    DistEnv,
    describe_collective_timeout,
    full_tensor,
    init_distributed,
    set_collective_timeout,
    shutdown_and_exit,
    use_deterministic_algorithms,
)
from titan_lite.finetune import base_fingerprint, describe_parameters
from titan_lite.loss import (
    global_target_count,
    loss_head,
    resolve_loss_chunks,
    sum_over_ranks,
)
from titan_lite.runtime.memory import TensorMemoryTracker
from titan_lite.runtime.metrics import MetricsLogger, peak_flops, tf32_advice
from titan_lite.hf.config import job_model_args
from titan_lite.runtime.host_allocator import keep_freed_memory
from titan_lite.models.llama3 import Transformer
from titan_lite.optim import (
    LossScaler,
    build_lr_scheduler,
    build_optimizer,
    clip_gradients,
)
from titan_lite.optim.in_backward import StepInBackward
from titan_lite.parallel.accumulation import gradient_sync
from titan_lite.parallel.activation_offload import OffloadSavedActivations
from titan_lite.parallel.dims import (
    ParallelDims,
    build_mesh,
    data_parallel_rank,
    resolve_degrees,
)
from titan_lite.parallel.pp import Pipeline
from titan_lite.data.tokenizer import Tokenizer, build_tokenizer
from titan_lite.validate import Evaluation, Validator

class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. the loss became NaN); the message says why."""


def log0(env: DistEnv, message: str) -> None:
    if env.rank == 0:
        print(message, flush=True)


def grad_accumulation_steps(cfg: JobConfig, dims: ParallelDims) -> int:
    if cfg.training.global_batch_size == -1:
        return 1
    return cfg.training.global_batch_size // (cfg.training.local_batch_size * dims.dp)


def tokens_per_rank_per_step(cfg: JobConfig, dims: ParallelDims, world_size: int) -> int:
    """Each rank's share of an optimizer step's tokens: tensor- and pipeline-parallel peers work
    on the same tokens, so tokens/s/rank x world size is the job's throughput in every layout
    (and per-rank MFU, against the whole model's FLOPs per token, stays right)."""
    global_tokens = (cfg.training.local_batch_size * cfg.training.seq_len * dims.dp
                     * grad_accumulation_steps(cfg, dims))
    return global_tokens // world_size


def resolve_auto_keys(cfg: JobConfig, dims: ParallelDims, vocab_size: int) -> JobConfig:
    """``cfg`` with the keys that default to 'auto' set to what this model and layout get."""
    chunks = resolve_loss_chunks(cfg.training.loss_chunks, vocab_size,
                                 dims.micro_batch_tokens(cfg.training, cfg.parallelism))
    return replace(cfg, training=replace(cfg.training, loss_chunks=chunks))


@dataclass
class StepRecipe:
    """How one optimizer step runs in this layout (shared by training and the estimator)."""
    accumulation: int  # micro-batches per optimizer step
    autocast: torch.autocast
    loss_context: Callable[[], ContextManager]  # loss parallel under TP, else nothing
    reduce_every_micro: bool
    grad_scale: int  # the data-parallel degree, which the gradient reduction averages over
    label_copies: int  # ranks that load the same labels: tensor- and pipeline-parallel peers
    loss_chunks: int = 1  # training.loss_chunks (resolved)
    compiled_loss: bool = False  # training.compile
    offload_activations: bool = False  # activation_checkpoint.offload
    on_offload: Callable[[torch.Tensor], None] | None = None  # sees each host copy

    def saved_tensors(self, module: torch.nn.Module) -> ContextManager:
        """Where the forward of ``module`` keeps what backward needs: here, or host memory."""
        if not self.offload_activations:
            return contextlib.nullcontext()
        return OffloadSavedActivations(module, self.on_offload)


def step_recipe(cfg: JobConfig, dims: ParallelDims, device: torch.device) -> StepRecipe:
    fsdp = dims.uses_fsdp(cfg.training.enable_cpu_offload)
    compute_dtype = DTYPES[cfg.training.mixed_precision_param]
    return StepRecipe(
        accumulation=grad_accumulation_steps(cfg, dims),
        # FSDP casts parameters itself (MixedPrecisionPolicy); without it, autocast does.
        autocast=torch.autocast(device.type, dtype=compute_dtype,
                                enabled=compute_dtype != torch.float32 and not fsdp),
        loss_context=(loss_parallel if dims.tp > 1 and cfg.parallelism.enable_loss_parallel
                      else contextlib.nullcontext),
        reduce_every_micro=not fsdp or cfg.parallelism.fsdp_reduce_every_microbatch,
        grad_scale=dims.dp, label_copies=dims.tp * dims.pp,
        loss_chunks=cfg.training.loss_chunks, compiled_loss=cfg.training.compile,
        offload_activations=cfg.activation_checkpoint.offload)


def forward_backward(runner: torch.nn.Module | Pipeline, next_batch: Callable[[], Batch],
                     device: torch.device, recipe: StepRecipe,
                     scaler: LossScaler | None = None,
                     in_backward: StepInBackward | None = None) -> torch.Tensor:
    """Forward and backward over one step's micro-batches, leaving in ``.grad`` the gradients
    of the mean loss over every target token of the global batch (titan_lite.loss), times
    float16's loss scale when ``scaler`` is enabled (or, ``in_backward``, stepping each unit
    with them during the last backward). Returns this rank's share of that mean,
    unscaled: summed over the ranks and divided by the tensor-parallel degree it is the step's
    loss (0 on pipeline ranks without the last stage)."""
    batches = [next_batch().to(device) for _ in range(recipe.accumulation)]
    # x dp: the data-parallel reduction averages the ranks' gradients; we want their sum.
    loss_scale = recipe.grad_scale / global_target_count([b.labels for b in batches],
                                                         recipe.label_copies)
    unscale = recipe.grad_scale
    if scaler is not None:  # (a disabled scaler's scale is 1)
        loss_scale, unscale = loss_scale * scaler.get_scale(), unscale * scaler.get_scale()
    if isinstance(runner, Pipeline):  # no accumulation: the schedule splits the batch
        with recipe.autocast, recipe.loss_context():
            return full_tensor(runner.step(batches[0], loss_scale)) / unscale
    step_loss = torch.zeros((), device=device)
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        with gradient_sync(runner, last or recipe.reduce_every_micro):
            # loss parallel: the cross entropy of vocab-sharded logits, forward and backward
            with recipe.loss_context():
                with recipe.autocast, recipe.saved_tensors(runner):
                    loss = runner(batch.inputs, **batch.model_kwargs(),
                                  head=loss_head(batch.labels, recipe.loss_chunks,
                                                 recipe.compiled_loss)) * loss_scale
                if in_backward is not None:
                    in_backward.arm(last)
                loss.backward()
        step_loss += full_tensor(loss.detach())
    return step_loss / unscale


def optimizer_step(parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                   max_norm: float, pipeline_group: dist.ProcessGroup | None,
                   scaler: LossScaler) -> tuple[torch.Tensor, bool]:
    """Unscale (float16), clip, step and free the gradients; returns the gradient norm before
    clipping and whether the step was skipped for inf/NaN gradients (the scale then halves).
    A step in backward has already happened: its norm is reported, and whether a unit
    skipped."""
    if isinstance(optimizer, StepInBackward):
        grad_norm, skipped = optimizer.finish()
        scaler.update(found_inf=skipped)
        return grad_norm, skipped
    scaler.unscale_(parameters)  # clipping sees the true gradients
    grad_norm = clip_gradients(parameters, max_norm, pipeline_group)
    # The norm covers every rank's shards and stages, so all ranks skip alike.
    skipped = scaler.is_enabled() and not torch.isfinite(grad_norm).item()
    if not skipped:
        optimizer.step()
    scaler.update(found_inf=skipped)
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def describe_layout(cfg: JobConfig, dims: ParallelDims, env: DistEnv) -> str:
    fsdp = dims.uses_fsdp(cfg.training.enable_cpu_offload)
    return (f"{env.world_size} rank(s) on {env.device.type} {dims}"
            f"{' with FSDP2' if fsdp else ''}"
            f"{' + CPU offload' if cfg.training.enable_cpu_offload else ''} | "
            f"AC {cfg.activation_checkpoint.mode}")


@dataclass
class TrainResult:
    losses: list[float]  # per step: the mean over the global batch's target tokens
    model_parts: list[Transformer]  # this rank's trained model, or its pipeline stages
    optimizer: torch.optim.Optimizer
    validation_losses: dict[int, float]  # step (0: before training) -> validation loss
    skipped_steps: list[int]  # float16: steps skipped for inf/NaN gradients
    loss_scale: float  # float16's loss scale after the last step (1.0 otherwise)


def build_evaluation(cfg: JobConfig, data: Data, parts: list[Transformer],
                     runner: torch.nn.Module | Pipeline, tokenizer: Tokenizer, env: DistEnv,
                     recipe: StepRecipe, dims: ParallelDims) -> Evaluation | None:
    """The validation (held-out loss, sample answers) this job asks for, or None."""
    if data.validation is None and not cfg.validation.sample_prompts:
        return None
    validator = None if data.validation is None else Validator(
        data.validation, runner, env.device, recipe.autocast, recipe.loss_context, dims.tp,
        recipe.label_copies, recipe.loss_chunks)
    template = None if cfg.data.format == "text" else build_chat_template(
        cfg.data.chat_template, tokenizer, cfg.tokenizer.path)
    return Evaluation(cfg, validator, parts, tokenizer, template, env.device,
                      log=lambda m: log0(env, m))


def train(cfg: JobConfig, env: DistEnv) -> TrainResult:
    """Train for ``cfg.training.steps`` optimizer steps."""
    dims, _ = resolve_degrees(cfg.parallelism, env.world_size)  # validated in parse_or_exit
    assert dims is not None
    fsdp = dims.uses_fsdp(cfg.training.enable_cpu_offload)
    mesh = build_mesh(dims, env.device.type, fsdp)
    if cfg.job.deterministic:  # (main did it before CUDA started; train() may be called alone)
        use_deterministic_algorithms()
    if cfg.training.compile and USER_INDUCTOR_CACHE_DIR is None:  # beside the run's outputs
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(
            os.path.join(cfg.job.dump_folder, "inductor_cache"))
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    args = job_model_args(cfg.model.flavor, cfg.model.init_from, cfg.training.seq_len, tokenizer)
    cfg = resolve_auto_keys(cfg, dims, args.vocab_size)
    # the data first: a bad record stops the job before weights load, and the builder's worker
    # processes fork from a process that holds no model yet
    data = build_data(cfg, tokenizer, env.local_rank, data_parallel_rank(mesh), dims.dp,
                      log=lambda m: log0(env, m))
    model = build_meta_model(cfg, args)
    num_params, flops_per_token = model.num_params(), model.flops_per_token(args.max_seq_len)
    check_model_fits(model, cfg, dims, env)
    parts, runner = build_model(cfg, model, dims, mesh, env)
    if cfg.model.init_from:
        load_pretrained(parts, cfg.model.init_from, args)
    modules = torch.nn.ModuleList(parts)  # one handle on this rank's parameters
    compute_dtype = DTYPES[cfg.training.mixed_precision_param]
    scaler = LossScaler(enabled=compute_dtype == torch.float16)
    optimizer = build_optimizer(modules, cfg.optimizer, scaler.get_scale)
    in_backward = optimizer if isinstance(optimizer, StepInBackward) else None
    scheduler = build_lr_scheduler(optimizer, cfg.lr_scheduler, cfg.training.steps)
    loader = data.train

    recipe = step_recipe(cfg, dims, env.device)
    pipeline_group = mesh["pp"].get_group() if dims.pp > 1 else None
    tokens_per_step = tokens_per_rank_per_step(cfg, dims, env.world_size)
    torch.set_float32_matmul_precision(cfg.training.float32_matmul_precision)
    peak, peak_source = peak_flops(env.device, compute_dtype, cfg.metrics,
                                   cfg.training.float32_matmul_precision)
    checkpointer, preemption, start_step = None, None, 0
    if cfg.checkpoint.enable:
        # a LoRA run's checkpoints identify the frozen base they were trained on
        frozen_base = base_fingerprint(parts) if cfg.lora.enable else None
        checkpointer = Checkpointer(cfg.checkpoint, cfg.job.dump_folder, parts, optimizer,
                                    scheduler, loader, frozen_base,
                                    save_frozen=cfg.lora.save_base, grad_scaler=scaler,
                                    device=env.device)
        start_step = checkpointer.restore()
        preemption = Preemption(env.device)
        log0(env, f"resumed from {checkpointer.folder}/step-{start_step}" if start_step else
             f"no checkpoint in {checkpointer.folder}: starting from step 1")
    tracker = None
    # (a dispatch-mode tracker cannot run inside compiled code: compiled runs report peak RSS)
    if env.device.type == "cpu" and cfg.metrics.track_cpu_memory and not cfg.training.compile:
        tracker = TensorMemoryTracker()
        optimizer_states = [v for state in optimizer.state.values() for v in state.values()]
        tracker.track([*modules.parameters(), *modules.buffers(), *optimizer_states])
    metrics = MetricsLogger(cfg.metrics, cfg.job.dump_folder, env.rank, env.device,
                            flops_per_token, peak, cfg.training.steps, tracker, start_step + 1)
    log0(env, f"{cfg.job.description}: llama3 {cfg.model.flavor}, {num_params:,} params, "
              f"vocab {tokenizer.vocab_size}, {flops_per_token / 1e6:.1f} MFLOP/token | "
              f"{describe_layout(cfg, dims, env)} | global batch "
              f"{cfg.training.local_batch_size * dims.dp * recipe.accumulation} x "
              f"{cfg.training.seq_len} ({recipe.accumulation} accumulation step(s)) | "
              f"{compute_dtype} compute | MFU peak: {peak_source}")
    log0(env, describe_parameters(model, modules))
    if env.device.type == "cuda":
        advice = tf32_advice(torch.cuda.get_device_capability(env.device), compute_dtype,
                             cfg.training.float32_matmul_precision)
        if advice:
            log0(env, advice)

    evaluation = build_evaluation(cfg, data, parts, runner, tokenizer, env, recipe, dims)
    if evaluation and start_step == 0 and cfg.validation.at_start:
        evaluation.run(0, metrics)

    losses: list[float] = []
    skipped_steps: list[int] = []
    stop = False
    interval_start, last_logged_step, optimizer_seconds = time.perf_counter(), start_step, 0.0
    for step in range(start_step + 1, cfg.training.steps + 1):
        with tracker or contextlib.nullcontext():
            step_loss = forward_backward(runner, loader.next_batch, env.device, recipe, scaler,
                                         in_backward)
            optimizer_start = _synchronized_time(env.device)
            lr = optimizer.param_groups[0]["lr"]
            grad_norm, skipped = optimizer_step(list(modules.parameters()), optimizer,
                                                cfg.training.max_norm, pipeline_group, scaler)
            optimizer_seconds += _synchronized_time(env.device) - optimizer_start
        scheduler.step()  # a skipped step still counts in the schedule, as in torch's recipe
        if step == start_step + 1:  # start-up (caches, loading, the first compile) is over
            unapplied = set_collective_timeout(cfg.comm.train_timeout_seconds, mesh)
            if unapplied:
                log0(env, unapplied)
            if cfg.training.compile:
                log0(env, f"torch.compile: step {step} took "
                          f"{time.perf_counter() - interval_start:.1f} s, compiling included "
                          "(cold unless Inductor's cache had the kernels)")
        if skipped:
            skipped_steps.append(step)

        loss_value = (sum_over_ranks(step_loss) / dims.tp).item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss is {loss_value} at step {step}: stopping (try a lower "
                                "optimizer.lr or training.max_norm)")
        losses.append(loss_value)
        if step % cfg.metrics.log_freq == 0 or step == cfg.training.steps:
            steps = step - last_logged_step
            metrics.log(step, loss_value, grad_norm.item(), lr, steps * tokens_per_step,
                        time.perf_counter() - interval_start, optimizer_seconds / steps,
                        scaler.get_scale() if scaler.is_enabled() else None,
                        sum(s > last_logged_step for s in skipped_steps))
            interval_start, last_logged_step, optimizer_seconds = time.perf_counter(), step, 0.0
        stop = preemption is not None and preemption.requested()
        if evaluation and not stop and evaluation.due(step):
            interval_start += evaluation.run(step, metrics)  # not training time
        if checkpointer and (step % cfg.checkpoint.interval == 0 or step == cfg.training.steps
                             or stop):
            checkpointer.save(step)
        if stop:
            break
    if checkpointer:
        checkpointer.wait()  # an async save must be complete before the process ends
        if stop:
            log0(env, f"stopping after step {step} on a signal; checkpoint saved")
    metrics.close()
    if in_backward is not None:
        in_backward.close()
    return TrainResult(losses, parts, optimizer, evaluation.losses if evaluation else {},
                       skipped_steps, scaler.get_scale())


def _synchronized_time(device: torch.device) -> float:
    """Wall time after the device finished its queued work (so phases can be timed apart)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def save_config(cfg: JobConfig, env: DistEnv) -> None:
    if env.rank == 0:
        os.makedirs(cfg.job.dump_folder, exist_ok=True)
        with open(os.path.join(cfg.job.dump_folder, "config.toml"), "w") as fh:
            fh.write(cfg.to_toml())


def main(argv: list[str] | None = None) -> None:
    cfg = parse_or_exit(argv)  # every config problem exits 2 here, before any collective
    if cfg.job.deterministic:
        use_deterministic_algorithms()
    env = init_distributed(cfg.training.device, cfg.comm.init_timeout_seconds,
                           host_collectives=cfg.training.enable_cpu_offload)
    if env.device.type == "cpu":  # each step's tensors reuse the last step's pages
        keep_freed_memory()
    code = 0
    try:
        save_config(cfg, env)
        train(cfg, env)
    except (FitError, TrainingError, CheckpointError, ValueError) as e:
        print(f"[rank{env.rank}] error: {e}", file=sys.stderr, flush=True)
        code = 2 if isinstance(e, (FitError, ValueError)) else 1
    except BaseException as e:  # noqa: BLE001 - report, then leave with a non-zero status
        timed_out = describe_collective_timeout(e)
        if timed_out:
            print(f"[rank{env.rank}] error: {timed_out}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
        code = 1
    shutdown_and_exit(code)


if __name__ == "__main__":
    main()
