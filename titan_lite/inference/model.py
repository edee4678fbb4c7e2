"""The model a tool answers with (generate, predict, evaluate): a job's newest checkpoint, a
step-N, or a Hugging Face folder, unsharded in one process."""

from __future__ import annotations

import os
import re

import torch

from titan_lite.build import build_finetuned_model, load_pretrained
from titan_lite.checkpoint import complete_steps, is_checkpoint
from titan_lite.config import JobConfig
from titan_lite.data.tokenizer import Tokenizer
from titan_lite.hf.config import has_config_json, job_model_args
from titan_lite.models.llama3 import Transformer
from titan_lite.runtime.distributed import DTYPES

_STEP = re.compile(r"step-\d+")


def weights_folder(cfg: JobConfig) -> str:
    """The folder generation.checkpoint names (see its help); ValueError when there is none."""
    choice = cfg.generation.checkpoint
    folder = os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder)
    if not choice:
        steps = complete_steps(folder)
        if steps:
            return os.path.join(folder, f"step-{steps[-1]}")
        if cfg.model.init_from:
            return cfg.model.init_from
        raise ValueError(f"generation.checkpoint: no checkpoint in {folder} and no "
                         "model.init_from: nothing to generate from (train with "
                         "checkpoint.enable = true, or name a folder)")
    path = os.path.join(folder, choice) if _STEP.fullmatch(choice) else choice
    if not (is_checkpoint(path) or has_config_json(path)):
        raise ValueError(f"generation.checkpoint: {path!r} is neither a complete titan_lite "
                         "checkpoint nor a Hugging Face folder (config.json)")
    return path


def answer_device(cfg: JobConfig) -> torch.device:
    """Where a tool answering in one process runs: CUDA when present (training.device)."""
    use_cuda = cfg.training.device != "cpu" and torch.cuda.is_available()
    return torch.device("cuda" if use_cuda else "cpu")


def load_model(cfg: JobConfig, tokenizer: Tokenizer, device: torch.device) -> Transformer:
    """The job's model, unsharded on ``device`` in the training compute dtype, with the weights
    of ``weights_folder(cfg)`` (a LoRA job: its base, with that checkpoint's adapters)."""
    args = job_model_args(cfg.model.flavor, cfg.model.init_from, cfg.training.seq_len, tokenizer)
    folder = weights_folder(cfg)
    if cfg.lora.enable:  # the base as trained on, plus the checkpoint's adapters
        adapters = is_checkpoint(folder) and folder != cfg.model.init_from
        return build_finetuned_model(cfg, args, device, folder if adapters else None)
    with torch.device("meta"):
        model = Transformer(args).to(DTYPES[cfg.training.mixed_precision_param])
    model.to_empty(device=device)
    model.init_buffers()
    load_pretrained([model], folder, args)
    return model.eval()
