"""Job configuration: the dataclasses below are the single source of truth.

TOML sections and keys, ``--section.key value`` command-line overrides, defaults, validation and
``--help`` text are all generated from them. Every problem is collected and reported at once as
one line each; ``main`` exits with status 2 on any of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python < 3.11
    import tomli as tomllib

from titan_lite.models.llama3 import FLAVORS

DEFAULT_CONFIG = "train_configs/debug_model.toml"


def opt(default: Any, help: str, *, choices: list | None = None, min: float | None = None,
        max: float | None = None) -> Any:
    """A config field: default, help text and the allowed values that validation enforces."""
    meta = {"help": help, "choices": choices, "min": min, "max": max}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    description: str = opt("titan_lite training job", "Free text printed at start-up.")
    dump_folder: str = opt("./outputs", "Folder for this run's metrics and saved config.")
    seed: int = opt(0, "Seed for weight init and data order; equal seeds give equal runs.", min=0)
    deterministic: bool = opt(False, "Use only deterministic kernels "
                              "(torch.use_deterministic_algorithms); slower.")


@dataclass
class Model:
    name: str = opt("llama3", "Model family.", choices=["llama3"])
    flavor: str = opt("debugmodel", "Model size; the vocab size always comes from the tokenizer.",
                      choices=list(FLAVORS))


@dataclass
class Tokenizer:
    kind: str = opt("tiktoken", "tiktoken: Llama 3 BPE file (base64 token + rank per line); "
                    "sentencepiece: Llama 2 style .model file.",
                    choices=["tiktoken", "sentencepiece"])
    path: str = opt("titan_lite/assets/tokenizers/test_tiktoken.model",
                    "Tokenizer file (a real Llama 3 tokenizer.model works here).")


@dataclass
class Data:
    paths: list[str] = opt(["titan_lite/assets/data/kjv_sample.jsonl"],
                           "Corpora: .txt files (one document each), .jsonl files (one document "
                           "per line) or folders of such files.")
    text_field: str = opt("text", "Field of each .jsonl record that holds the text.")
    cache_dir: str = opt("", "Where the tokenized uint32 cache goes; empty: beside the source.")
    shuffle: bool = opt(True, "Shuffle the packed samples every epoch (seeded by job.seed).")


@dataclass
class Optimizer:
    name: str = opt("AdamW", "Optimizer.", choices=["AdamW"])
    lr: float = opt(8e-4, "Peak learning rate.", min=0.0)
    beta1: float = opt(0.9, "AdamW beta1.", min=0.0, max=1.0)
    beta2: float = opt(0.95, "AdamW beta2.", min=0.0, max=1.0)
    eps: float = opt(1e-8, "AdamW epsilon.", min=0.0)
    weight_decay: float = opt(0.1, "Decoupled weight decay for matrices; norms get none.",
                              min=0.0)
    implementation: str = opt("foreach", "foreach: multi-tensor kernels (any device); "
                              "fused: one fused kernel; for-loop: per-parameter reference.",
                              choices=["foreach", "fused", "for-loop"])


@dataclass
class LRScheduler:
    warmup_steps: int = opt(2, "Linear warmup steps from ~0 to optimizer.lr.", min=0)
    decay_type: str = opt("linear", "Decay after warmup down to the floor.",
                          choices=["linear", "cosine", "constant"])
    min_lr_ratio: float = opt(0.0, "LR floor at the last step, as a fraction of optimizer.lr.",
                              min=0.0, max=1.0)


@dataclass
class Training:
    local_batch_size: int = opt(8, "Sequences per micro-batch on each rank.", min=1)
    global_batch_size: int = opt(-1, "Sequences per optimizer step over all ranks; a multiple "
                                 "of local_batch_size x data-parallel degree (the quotient is "
                                 "the gradient accumulation count). -1: no accumulation.", min=-1)
    seq_len: int = opt(2048, "Tokens per sequence.", min=1)
    steps: int = opt(10, "Optimizer steps to train.", min=1)
    max_norm: float = opt(1.0, "Clip gradients to this global L2 norm; 0 disables clipping.",
                          min=0.0)
    mixed_precision_param: str = opt("float32", "Compute dtype of matmuls (autocast); weights "
                                     "and optimizer states stay float32.",
                                     choices=["float32", "bfloat16"])
    device: str = opt("auto", "auto: CUDA + nccl when present, else CPU + gloo.",
                      choices=["auto", "cuda", "cpu"])


@dataclass
class Parallelism:
    dp_replicate: int = opt(-1, "Replicated data-parallel degree (DDP); -1: the world size left "
                            "after the other degrees.", min=-1)
    dp_shard: int = opt(1, "Sharded data-parallel degree (FSDP2). Only 1 until FSDP lands.",
                        min=-1)
    tensor_parallel_degree: int = opt(1, "Tensor-parallel degree. Only 1 until TP lands.", min=1)
    pipeline_parallel_degree: int = opt(1, "Pipeline-parallel degree. Only 1 until PP lands.",
                                        min=1)


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "Activation checkpointing. Only 'none' until AC lands.",
                    choices=["none", "full", "selective"])


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save and resume distributed checkpoints. Not available yet.")


@dataclass
class Metrics:
    log_freq: int = opt(1, "Print and record metrics every this many steps.", min=1)
    enable_jsonl: bool = opt(True, "Write metrics as JSON lines to "
                             "<dump_folder>/metrics/rank<N>.jsonl.")
    jsonl_all_ranks: bool = opt(False, "Every rank writes its JSONL file, not just rank 0.")
    enable_tensorboard: bool = opt(False, "Also write TensorBoard events (needs the tensorboard "
                                   "package).")
    cpu_peak_tflops: float = opt(0.0, "Peak TFLOP/s of one rank for MFU on CPU; 0: measure a "
                                 "float32 matmul at start-up.", min=0.0)


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The whole config as TOML that ``load_config`` reads back to an equal JobConfig."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    return repr(value)


class ConfigError(Exception):
    """One or more configuration problems, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------------
# Schema helpers


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore


def _keys(section_cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(section_cls)
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    for name, f in fields.items():
        f.type = hints[name]
    return fields


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def _did_you_mean(name: str, candidates: list[str]) -> str:
    by_lower = {c.lower(): c for c in candidates}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3,
                                                             cutoff=0.6)]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _from_string(text: str, tp: Any) -> Any:
    """Parse a command-line string into the field's type; ValueError when it does not fit."""
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return [_from_string(part.strip(), item) for part in text.split(",") if part.strip()]
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError
    return tp(text)


def _check_toml_value(value: Any, tp: Any) -> Any:
    """Return the TOML value in the field's type; ValueError when it does not fit."""
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ValueError
        return [_check_toml_value(v, typing.get_args(tp)[0]) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not tp:  # bool is an int subclass: compare exact types
        raise ValueError
    return value


def _check_range(value: Any, f: dataclasses.Field) -> str | None:
    meta = f.metadata
    if meta["choices"] is not None and value not in meta["choices"]:
        return (f"{value!r} is not one of {', '.join(map(repr, meta['choices']))}"
                + _did_you_mean(str(value), [str(c) for c in meta["choices"]]))
    if meta["min"] is not None and value < meta["min"]:
        return f"{value!r} is below the minimum {meta['min']}"
    if meta["max"] is not None and value > meta["max"]:
        return f"{value!r} is above the maximum {meta['max']}"
    return None


# ---------------------------------------------------------------------------------------------
# Loading


def _parse_argv(argv: list[str], problems: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split argv into the --config path and (dotted key, raw value) overrides."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            problems.append(f"command line: unexpected argument {arg!r} "
                            "(options look like --section.key value)")
            i += 1
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if next_is_value else "true"  # a bare flag switches a bool on
            i += 1 if next_is_value else 0
        i += 1
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
    return config_path, overrides


def _lookup(dotted: str, where: str, problems: list[str]) -> tuple[str, dataclasses.Field] | None:
    sections = _sections()
    section, _, key = dotted.partition(".")
    if section not in sections:
        hint = _did_you_mean(section, list(sections))
        problems.append(f"{where}: unknown section {section!r}{hint}")
        return None
    fields = _keys(sections[section])
    if key not in fields:
        hint = _did_you_mean(key, list(fields))
        problems.append(f"{where}: unknown key {key!r} in section [{section}]{hint}")
        return None
    return section, fields[key]


def _set(values: dict[str, dict[str, Any]], dotted: str, raw: Any, parse, where: str,
         problems: list[str]) -> None:
    """Parse ``raw`` for the key ``section.key`` and record it, or record why not."""
    found = _lookup(dotted, where, problems)
    if found is None:
        return
    section, f = found
    try:
        value = parse(raw, f.type)
    except ValueError:
        problems.append(f"{where}: expected {_type_name(f.type)}, got {raw!r}")
        return
    problem = _check_range(value, f)
    if problem:
        problems.append(f"{where}: {problem}")
    else:
        values.setdefault(section, {})[f.name] = value


def _read_toml(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problems.append(f"{path}: config file not found")
    except IsADirectoryError:
        problems.append(f"{path}: is a folder, expected a .toml file")
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{path}: invalid TOML: {e}")
    return {}


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Build the JobConfig from ``--config FILE`` (default debug model) and overrides.

    Raises ConfigError listing every problem found.
    """
    argv = sys.argv[1:] if argv is None else argv
    problems: list[str] = []
    config_path, overrides = _parse_argv(argv, problems)
    config_path = config_path or DEFAULT_CONFIG
    values: dict[str, dict[str, Any]] = {}
    for section, table in _read_toml(config_path, problems).items():
        if not isinstance(table, dict):
            problems.append(f"{config_path}: {section!r} must be a [section] table")
            continue
        for key, raw in table.items():
            _set(values, f"{section}.{key}", raw, _check_toml_value,
                 f"{config_path}: [{section}] {key}", problems)
    for dotted, raw in overrides:
        _set(values, dotted, raw, _from_string, f"--{dotted}", problems)
    if problems:
        raise ConfigError(problems)
    return JobConfig(**{name: cls(**values.get(name, {})) for name, cls in _sections().items()})


def help_text() -> str:
    """--help: every key with its type, default and help, generated from the dataclasses."""
    lines = ["usage: python -m titan_lite.train [--config FILE] [--section.key VALUE ...]",
             "",
             f"--config FILE  TOML job config (default: {DEFAULT_CONFIG}).",
             "Every key below can be set in the file's [section] or overridden on the command",
             "line; lists are comma-separated, booleans true/false (a bare flag means true).",
             ""]
    for section, cls in _sections().items():
        lines.append(f"[{section}]")
        for name, f in _keys(cls).items():
            default = f.default_factory() if callable(f.default_factory) else f.default
            extra = f" Choices: {', '.join(map(str, f.metadata['choices']))}." \
                if f.metadata["choices"] else ""
            lines.append(f"  --{section}.{name} ({_type_name(f.type)}, default {default!r})")
            lines.append(f"      {f.metadata['help']}{extra}")
        lines.append("")
    return "\n".join(lines)


def check_job(cfg: JobConfig, world_size: int) -> list[str]:
    """Cross-key checks that need the world size; one line per problem (empty when fine)."""
    from titan_lite.parallel.dims import resolve_degrees

    dims, problems = resolve_degrees(cfg.parallelism, world_size)
    t = cfg.training
    if dims is not None and t.global_batch_size != -1:
        per_micro_step = t.local_batch_size * dims.dp
        if t.global_batch_size % per_micro_step:
            problems.append(f"training.global_batch_size: {t.global_batch_size} is not a multiple"
                            f" of local_batch_size x data-parallel degree ({t.local_batch_size} x "
                            f"{dims.dp} = {per_micro_step})")
    if t.global_batch_size == 0:
        problems.append("training.global_batch_size: 0 is not a batch size (use -1 or >= 1)")
    if cfg.activation_checkpoint.mode != "none":
        problems.append(f"activation_checkpoint.mode: {cfg.activation_checkpoint.mode!r} is not "
                        "available yet; use 'none'")
    if cfg.metrics.enable_tensorboard and importlib.util.find_spec("tensorboard") is None:
        problems.append("metrics.enable_tensorboard: the tensorboard package is not installed "
                        "(pip install tensorboard)")
    if cfg.checkpoint.enable:
        problems.append("checkpoint.enable: checkpointing is not available yet; use false")
    if t.device == "cuda" and not _cuda_available():
        problems.append("training.device: 'cuda' was asked for but no CUDA device is visible")
    if not cfg.data.paths:
        problems.append("data.paths: empty; name at least one corpus file or folder")
    for key, path in [("tokenizer.path", cfg.tokenizer.path)] + [
            ("data.paths", p) for p in cfg.data.paths]:
        if not os.path.exists(path):
            problems.append(f"{key}: {path!r} does not exist (relative paths are taken from "
                            f"{os.getcwd()})")
    return problems


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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


if __name__ == "__main__":
    # `python -m titan_lite.config --config FILE [overrides]`: check a job without launching it
    # (run_train.sh does this first, with WORLD_SIZE=NGPU, so mistakes never reach torchrun).
    parse_or_exit()
    print("config OK")
