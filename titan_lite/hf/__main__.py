"""``python -m titan_lite.hf import|export``: Hugging Face folders to titan_lite checkpoints and
back (a LoRA job's: merged, or as a PEFT adapter folder)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
import torch.distributed.checkpoint as dcp

from titan_lite.build import build_finetuned_model
from titan_lite.checkpoint import (
    CheckpointError,
    complete_steps,
    is_checkpoint,
    load_model_weights,
    publish,
)
from titan_lite.config import ConfigError, load_config
from titan_lite.data.tokenizer import build_tokenizer
from titan_lite.finetune import merge_adapters
from titan_lite.finetune.nf4 import dequantized
from titan_lite.hf.config import args_from_hf_config, has_config_json, job_model_args
from titan_lite.hf.weights import read_hf_tensor, SafetensorsFolder, save_hf, save_peft
from titan_lite.models.llama3 import Transformer

def import_checkpoint(argv: list[str] | None = None) -> None:
    """``python -m titan_lite.hf import --hf FOLDER --out FOLDER``: convert a Hugging Face Llama
    folder into a titan_lite checkpoint of its weights (DCP, in their stored dtype, plus its
    config.json) that ``--model.init_from`` loads into any layout, resharding as DCP does."""
    parser = argparse.ArgumentParser(prog="python -m titan_lite.hf import",
                                     description=import_checkpoint.__doc__)
    parser.add_argument("--hf", required=True, help="Hugging Face folder (config.json + "
                        "model.safetensors or model.safetensors.index.json and its shards)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write (created)")
    args = parser.parse_args(argv)
    try:
        model_args = args_from_hf_config(args.hf)
        source = SafetensorsFolder(args.hf)
        with torch.device("meta"):
            shapes = {name: p.shape for name, p in Transformer(model_args).named_parameters()}
        state = {f"model.{name}": read_hf_tensor(source, name, model_args, shape, [0] * len(shape))
                 for name, shape in shapes.items()}
    except (OSError, KeyError, ValueError) as e:
        parser.exit(2, f"error: cannot import {args.hf}: {e}\n")
    partial = args.out.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    dcp.save(state, checkpoint_id=partial, no_dist=True)
    shutil.copy(os.path.join(args.hf, "config.json"), partial)
    publish(partial, args.out)  # a killed conversion leaves no folder that looks complete
    print(f"wrote {args.hf} ({len(state)} tensors) as a titan_lite checkpoint: {args.out}")


def peft_base(base: str, init_from: str) -> str:
    """What a PEFT export names as its base (``base_model_name_or_path``): ``base`` (--base),
    else ``init_from`` when peft can load it (a Hugging Face folder, as an absolute path);
    ValueError saying what to do otherwise."""
    if base:
        return base
    if has_config_json(init_from) and not is_checkpoint(init_from):
        return os.path.abspath(init_from)
    what = (f"the titan_lite checkpoint {init_from}" if init_from
            else "drawn from job.seed (model.init_from is empty)")
    raise ValueError(f"--format peft: the base is {what}, which peft cannot load: give --base "
                     "the Hugging Face folder or hub name it came from, or export it first "
                     "(python -m titan_lite.hf export --config <its job> --out BASE) and give "
                     "--base BASE")


def export_checkpoint(argv: list[str] | None = None) -> None:
    """``python -m titan_lite.hf export --config JOB.toml [--step N] [--format merged|peft]
    --out FOLDER [overrides]``: write a titan_lite checkpoint of that job as a Hugging Face
    Llama folder (a LoRA job: with its adapters merged, or as a PEFT adapter folder)."""
    parser = argparse.ArgumentParser(prog="python -m titan_lite.hf export",
                                     description=export_checkpoint.__doc__)
    parser.add_argument("--out", required=True, help="folder to write (created)")
    parser.add_argument("--step", type=int, default=-1, help="checkpoint step; -1: newest")
    parser.add_argument("--max-shard-gb", type=float, default=5.0)
    parser.add_argument("--format", choices=["merged", "peft"], default="merged",
                        help="a LoRA job: merged = a plain Hugging Face Llama folder with the "
                        "adapters merged into the base (in lora.base_dtype); peft = a PEFT "
                        "adapter folder for the base of model.init_from")
    parser.add_argument("--base", default="",
                        help="--format peft: the Hugging Face folder or hub name of the base "
                        "(adapter_config.json's base_model_name_or_path, which peft loads); "
                        "default: model.init_from when it is a Hugging Face folder")
    args, job_argv = parser.parse_known_args(argv)
    try:
        cfg = load_config(job_argv)
    except ConfigError as e:
        parser.exit(2, "".join(f"config error: {p}\n" for p in e.problems))
    folder = os.path.join(cfg.job.dump_folder, cfg.checkpoint.folder)
    steps = complete_steps(folder)
    step = steps[-1] if args.step == -1 and steps else args.step
    if step not in steps:
        parser.exit(2, f"error: no complete checkpoint step-{step} in {folder} (found: "
                       f"{', '.join(map(str, steps)) or 'none'})\n")
    try:
        model_args = job_model_args(cfg.model.flavor, cfg.model.init_from, cfg.training.seq_len,
                                    build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path))
    except (OSError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    checkpoint = os.path.join(folder, f"step-{step}")
    if cfg.lora.enable:
        try:
            model = build_finetuned_model(cfg, model_args, torch.device("cpu"), checkpoint)
        except (OSError, ValueError, CheckpointError) as e:
            parser.exit(2, f"error: {e}\n")
        if args.format == "peft":
            try:
                base = peft_base(args.base, cfg.model.init_from)
            except ValueError as e:
                parser.exit(2, f"error: {e}\n")
            save_peft(model, model_args, args.out, base)
            print(f"wrote the adapters of {checkpoint} as a PEFT adapter folder: {args.out}")
            return
        state = merge_adapters({name: dequantized(p.detach()) for name, p in
                                model.named_parameters()}, cfg.lora.alpha / cfg.lora.rank)
    elif args.format == "peft":
        parser.exit(2, "error: --format peft: this job trains no adapters (lora.enable is "
                       "false); export it as --format merged\n")
    else:
        with torch.device("meta"):
            model = Transformer(model_args)
        model.to_empty(device="cpu")
        load_model_weights([model], checkpoint)
        state = model.state_dict()
    save_hf(state, model_args, args.out, int(args.max_shard_gb * 2**30))
    print(f"wrote {checkpoint} as a Hugging Face Llama folder: {args.out}")


_COMMANDS = {"import": import_checkpoint, "export": export_checkpoint}


def main(argv: list[str]) -> None:
    """Run the ``import`` or ``export`` command named by ``argv[0]``."""
    if argv[:1] and argv[0] in _COMMANDS:
        _COMMANDS[argv[0]](argv[1:])
    else:
        sys.exit("usage: python -m titan_lite.hf import --hf HF_FOLDER --out CHECKPOINT_FOLDER\n"
                 "       python -m titan_lite.hf export --config JOB.toml [--step N] "
                 "--out HF_FOLDER [--section.key value ...]")


if __name__ == "__main__":
    main(sys.argv[1:])
