"""Checks across keys (degrees vs. world size, batch sizes, files, optional packages) and the
entry points' loader that turns any problem into one line each and exit status 2."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from titan_lite.checkpoint import is_checkpoint
from titan_lite.config.loader import ConfigError, help_text, load_config
from titan_lite.config.schema import CHAT_TEMPLATES, JobConfig
from titan_lite.finetune.nf4 import INSTALL_HINT, nf4_available, nf4_problems
from titan_lite.hf.config import has_config_json, job_model_args
from titan_lite.models.llama3 import ModelArgs
from titan_lite.optim.compact import INT8_HINT, int8_available
from titan_lite.parallel.activation_checkpoint import checkpoint_every
from titan_lite.parallel.dims import ParallelDims, resolve_degrees
from titan_lite.parallel.pp import pp_problems
from titan_lite.parallel.tp import tp_problems
from titan_lite.data.tokenizer import find_tokenizer


def check_job(cfg: JobConfig, world_size: int, training_here: bool = True) -> list[str]:
    """Cross-key checks that need the world size; one line per problem (empty when fine).
    ``training_here`` false (the memory estimator) skips what only this machine's training
    needs: the files and the device."""
    dims, problems = resolve_degrees(cfg.parallelism, world_size)
    t = cfg.training
    if dims is not None and t.global_batch_size != -1:
        per_micro_step = t.local_batch_size * dims.dp
        if t.global_batch_size % per_micro_step:
            problems.append(f"training.global_batch_size: {t.global_batch_size} is not a multiple"
                            f" of local_batch_size x data-parallel degree ({t.local_batch_size} x "
                            f"{dims.dp} = {per_micro_step})")
    micro_tokens = dims.micro_batch_tokens(t, cfg.parallelism) if dims is not None else None
    if micro_tokens is not None and t.loss_chunks > micro_tokens:
        problems.append(f"training.loss_chunks: {t.loss_chunks} slices for {micro_tokens} "
                        "tokens per micro-batch; use at most one slice per token (0: auto)")
    if t.global_batch_size == 0:
        problems.append("training.global_batch_size: 0 is not a batch size (use -1 or >= 1)")
    try:
        checkpoint_every(cfg.activation_checkpoint.selective_ac_option)
    except ValueError as e:
        problems.append(str(e))
    args, architecture_problems = _architecture(cfg)
    problems += architecture_problems
    if args is not None and dims is not None and dims.tp > 1:
        problems += tp_problems(args, dims.tp)
    if args is not None and dims is not None and dims.pp > 1:
        problems += pp_problems(args, cfg.parallelism, cfg.training, dims)
    if dims is not None and not dims.uses_fsdp(t.enable_cpu_offload):
        if t.mixed_precision_reduce != "float32":
            problems.append("training.mixed_precision_reduce: only FSDP reduces in another dtype;"
                            " with dp_shard 1 and no CPU offload use 'float32'")
    if cfg.metrics.enable_tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("metrics.enable_tensorboard: the tensorboard package is not installed "
                        "(pip install tensorboard)")
    if cfg.activation_checkpoint.offload and dims is not None and dims.pp > 1:
        problems.append("activation_checkpoint.offload: not supported with pipeline parallel "
                        "yet")
    if cfg.training.compile and dims is not None and dims.tp > 1:
        problems.append("training.compile: not with tensor parallel yet (with torch 2.13 the "
                        "backward of compiled blocks on DTensor activations fails)")
    if cfg.training.compile and cfg.activation_checkpoint.offload:
        problems.append("training.compile: not with activation_checkpoint.offload (its "
                        "saved-tensor hooks would have to run inside the compiled blocks)")
    if cfg.checkpoint.load_step == 0:
        problems.append("checkpoint.load_step: 0 is not a step (use -1 for the newest "
                        "checkpoint, or a saved step >= 1)")
    problems += _data_problems(cfg, dims)
    problems += _optimizer_problems(cfg, dims)
    if args is not None:
        problems += _lora_problems(cfg, dims, args)
    if training_here:
        problems += _local_problems(cfg)
    return problems


def _architecture(cfg: JobConfig) -> tuple[ModelArgs | None, list[str]]:
    """The job's architecture (model.flavor's, or model.init_from's config.json's), or None and
    why it cannot be had: the config.json's file and field, or how it differs from the flavor.
    (The tokenizer is checked against it when training loads both.)"""
    try:
        return job_model_args(cfg.model.flavor, cfg.model.init_from, cfg.training.seq_len,
                              tokenizer=None), []
    except ValueError as e:
        message = str(e)
        return None, [message if message.startswith("model.") else
                      f"model.init_from: {message}"]


def _optimizer_problems(cfg: JobConfig, dims: ParallelDims | None) -> list[str]:
    """The host optimizer's knobs: what the step in backward needs, int8's package."""
    problems = []
    if cfg.optimizer.state_dtype == "int8" and not int8_available():
        problems.append(f"optimizer.state_dtype: {INT8_HINT}")
    if cfg.optimizer.state_dtype == "int8" and dims is not None and dims.tp > 1:
        problems.append("optimizer.state_dtype: 'int8' not with tensor parallel (a row-wise "
                        "shard would split its blocks of 256); use 'bfloat16'")
    if not cfg.optimizer.in_backward:
        return problems
    if not cfg.training.enable_cpu_offload:
        problems.append("optimizer.in_backward: steps on the host as gradients reach it; set "
                        "training.enable_cpu_offload = true")
    if cfg.training.max_norm > 0:
        problems.append("optimizer.in_backward: each unit steps before the global gradient norm"
                        " exists, so it cannot be clipped: set training.max_norm = 0 (the "
                        "norm is still logged)")
    if dims is not None and (dims.pp > 1 or dims.tp > 1):
        problems.append("optimizer.in_backward: not with pipeline or tensor parallel (FSDP "
                        "data parallel only)")
    return problems


def _data_problems(cfg: JobConfig, dims: ParallelDims | None) -> list[str]:
    """Keys of [data], [validation] and [generation] that contradict each other."""
    problems = []
    d, v = cfg.data, cfg.validation
    if d.format == "text" and d.train_on_prompt:
        problems.append("data.train_on_prompt: plain text has no prompts (every token is "
                        "learned); it applies to data.format 'alpaca' and 'chat'")
    if v.paths and v.split > 0:
        problems.append("validation.split: validation.paths already names the held-out data; "
                        "set one of them")
    if (v.interval or v.steps != -1) and not (v.paths or v.split > 0):
        problems.append("validation.interval/steps: there is no validation data (set "
                        "validation.paths or validation.split)")
    if v.sample_prompts and dims is not None and dims.pp > 1:
        problems.append("validation.sample_prompts: generation needs the whole model in each "
                        "process; it is not supported with pipeline parallel")
    if d.chat_template.endswith(".jinja"):
        if not os.path.isfile(d.chat_template):
            problems.append(f"data.chat_template: {d.chat_template} does not exist")
    elif d.chat_template not in CHAT_TEMPLATES:
        problems.append(f"data.chat_template: {d.chat_template!r} is not one of "
                        f"{', '.join(map(repr, CHAT_TEMPLATES))} or a .jinja file")
    return problems


def _lora_problems(cfg: JobConfig, dims: ParallelDims | None, args: ModelArgs) -> list[str]:
    """[lora] keys that cannot work, alone or in this layout."""
    lora, problems = cfg.lora, []
    if not lora.enable:
        if lora.quantize_base != "none":
            problems.append("lora.quantize_base: quantising the frozen base needs "
                            "lora.enable = true")
        return problems
    if lora.alpha <= 0:
        problems.append(f"lora.alpha: {lora.alpha!r} must be > 0 (the update is scaled by "
                        "alpha / rank)")
    if not lora.target_modules:
        problems.append("lora.target_modules: empty; name at least one linear")
    if "output" in lora.target_modules and args.tie_word_embeddings:
        problems.append(f"lora.target_modules: model {cfg.model.flavor!r} ties the output to "
                        "the embedding, so 'output' cannot get its own adapter")
    if lora.embedding_on_host and args.tie_word_embeddings:
        problems.append(f"lora.embedding_on_host: model {cfg.model.flavor!r} ties the output "
                        "to the embedding; its table must be on the device for the output "
                        "projection")
    for degree, name in ((dims.tp if dims else 1, "tensor_parallel_degree"),
                         (dims.pp if dims else 1, "pipeline_parallel_degree")):
        if degree > 1:
            problems.append(f"lora.enable: adapters are not supported with "
                            f"parallelism.{name} > 1 yet; use FSDP (dp_shard) instead")
    if lora.quantize_base == "nf4":
        if not nf4_available():
            problems.append(f"lora.quantize_base: 'nf4' needs torchao, which is not "
                            f"installed: {INSTALL_HINT}")
        if lora.save_base:
            problems.append("lora.save_base: an NF4 base cannot be stored in a checkpoint; "
                            "it is rebuilt from model.init_from on resume")
        fsdp = dims is not None and dims.uses_fsdp(cfg.training.enable_cpu_offload)
        shards = dims.dp_shard if fsdp else 1  # one shard: streamed from the host, whole
        problems += [f"lora.quantize_base: {p}" for p in
                     filter(None, (nf4_problems(shape, shards) for shape in
                                   _block_linear_shapes(args)))][:1]
    return problems


def _block_linear_shapes(args: ModelArgs) -> list[tuple[int, int]]:
    q, kv = args.n_heads * args.head_dim, args.kv_heads * args.head_dim
    return [(q, args.dim), (kv, args.dim), (args.dim, q), (args.ffn_hidden_dim, args.dim),
            (args.dim, args.ffn_hidden_dim)]


def _local_problems(cfg: JobConfig) -> list[str]:
    """What training on this machine needs: the device, the corpus and tokenizer files."""
    problems = []
    if cfg.training.device == "cuda" and not _cuda_available():
        problems.append("training.device: 'cuda' was asked for but no CUDA device is visible")
    if cfg.activation_checkpoint.offload and (cfg.training.device == "cpu"
                                              or not _cuda_available()):
        problems.append("activation_checkpoint.offload: needs a GPU (it moves saved "
                        "activations to host memory, where a CPU run keeps them anyway)")
    if (cfg.training.mixed_precision_param == "bfloat16" and cfg.training.device != "cpu"
            and _cuda_available() and not _cuda_has_bfloat16()):
        problems.append("training.mixed_precision_param: this GPU has no bfloat16 (pre-Ampere:"
                        " V100, T4, RTX 20xx); use 'float16', which adds loss scaling")
    if not cfg.data.paths:
        problems.append("data.paths: empty; name at least one corpus file or folder")
    weights = cfg.data.weights
    if weights and (len(weights) != len(cfg.data.paths) or min(weights) <= 0):
        problems.append(f"data.weights: {len(weights)} weight(s) for {len(cfg.data.paths)} "
                        "data.paths: give one positive weight per path (or none)")
    if weights and cfg.validation.split > 0:
        problems.append("validation.split: not with data.weights (a mixture); name held-out "
                        "data in validation.paths")
    if cfg.model.init_from and not (has_config_json(cfg.model.init_from)
                                    or is_checkpoint(cfg.model.init_from)):
        problems.append(f"model.init_from: {cfg.model.init_from!r} is neither a Hugging Face "
                        "folder (config.json) nor a titan_lite checkpoint (.metadata)")
    if os.path.exists(cfg.tokenizer.path):
        try:
            find_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
        except ValueError as e:
            problems.append(str(e))
    for key, path in [("tokenizer.path", cfg.tokenizer.path)] + [
            ("data.paths", p) for p in cfg.data.paths] + [
            ("validation.paths", p) for p in cfg.validation.paths]:
        if not os.path.exists(path):
            problems.append(f"{key}: {path!r} does not exist (relative paths are taken from "
                            f"{os.getcwd()})")
    return problems


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _cuda_has_bfloat16() -> bool:
    return torch.cuda.is_bf16_supported(including_emulation=False)


def parse_or_exit(argv: list[str] | None = None) -> JobConfig:
    """Entry points' loader: prints help, or every problem (exit 2), before any collective."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        sys.exit(0)
    try:
        cfg = load_config(argv)
        problems = check_job(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        if problems:
            raise ConfigError(problems)
        return cfg
    except ConfigError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank{rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" \
            else ""
        for problem in e.problems:
            print(f"{prefix}config error: {problem}", file=sys.stderr)
        sys.exit(2)
