"""Answer prompts with a job's model: its newest checkpoint, a step-N, or a Hugging Face folder.

    python -m titan_lite.generate --config train_configs/debug_sft.toml --chat \\
        --prompt "What is the first word of this verse? ..." --max_new_tokens 32

Bare ``--key value`` options are ``[generation]`` keys (prompt, chat, system, max_new_tokens,
temperature, top_k, top_p, seed, checkpoint); every other ``--section.key value`` overrides the
job's config as in training. One process, on CUDA when present (training.device), in
training.mixed_precision_param; with ``--chat`` and no prompt, an interactive chat on stdin.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from titan_lite.checkpoint import CheckpointError, complete_steps, is_checkpoint
from titan_lite.config import ConfigError, JobConfig, expand_bare_keys, help_text, load_config
from titan_lite.data import ChatTemplate, build_chat_template
from titan_lite.data.chat import Message
from titan_lite.distributed import DTYPES, shutdown_and_exit
from titan_lite.generation import generate, prompt_ids, stop_ids
from titan_lite.hf_config import has_config_json, job_model_args
from titan_lite.models.llama3 import Transformer
from titan_lite.tokenizer import Tokenizer, build_tokenizer
from titan_lite.build import build_finetuned_model, load_pretrained

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


def _answer(model: Transformer, ids: list[int], cfg: JobConfig, tokenizer: Tokenizer,
            template: ChatTemplate | None, device: torch.device) -> str:
    out = generate(model, ids, cfg.generation, stop_ids(tokenizer, template), device)
    print(f"[{len(ids)} prompt tokens in {out.prefill_seconds:.2f} s, {len(out.ids)} new "
          f"tokens at {out.tokens_per_s:.1f} tokens/s]", file=sys.stderr, flush=True)
    return tokenizer.decode(out.ids)


def chat_loop(model: Transformer, cfg: JobConfig, tokenizer: Tokenizer,
              template: ChatTemplate, device: torch.device) -> None:
    """Read user turns from stdin until EOF, answering each with the whole conversation."""
    history: list[Message] = []
    print("chat: type a message, Ctrl-D to end", file=sys.stderr)
    for line in sys.stdin:
        text = line.strip()
        if not text:
            continue
        ids = prompt_ids(text, tokenizer, template, history, cfg.generation.system)
        answer = _answer(model, ids, cfg, tokenizer, template, device)
        print(answer, flush=True)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def run(cfg: JobConfig) -> None:
    g = cfg.generation
    if not g.prompt and not g.chat:
        raise ValueError("generation.prompt: give --prompt TEXT, or --chat for a conversation")
    device = answer_device(cfg)
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    template = None
    if g.chat:
        template = build_chat_template(cfg.data.chat_template, tokenizer, cfg.tokenizer.path)
        print(f"chat template: {template.describe}", file=sys.stderr)
    model = load_model(cfg, tokenizer, device)
    if g.chat and not g.prompt:
        chat_loop(model, cfg, tokenizer, template, device)
        return
    ids = prompt_ids(g.prompt, tokenizer, template, system=g.system)
    print(_answer(model, ids, cfg, tokenizer, template, device), flush=True)


def answer_cli(run_job: Callable[[JobConfig], object], argv: list[str] | None, module: str,
               sections: tuple[str, ...]) -> None:
    """The command line of a tool that answers with a job's model (``module``: generate,
    predict, evaluate): bare ``--key`` options of ``sections``, --help, and one line + exit
    status 2 for a bad config, bad input or a checkpoint that is not this model's."""
    argv = expand_bare_keys(sys.argv[1:] if argv is None else argv, sections)
    if "--help" in argv or "-h" in argv:
        print(help_text().replace("titan_lite.train", module))
        sys.exit(0)
    code = 0
    try:
        run_job(load_config(argv))
    except ConfigError as e:
        for problem in e.problems:
            print(f"config error: {problem}", file=sys.stderr)
        code = 2
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if dist.is_initialized():  # (started by torchrun: leave as a trainer's rank does)
        shutdown_and_exit(code)
    if code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    answer_cli(run, argv, "titan_lite.generate", ("generation",))


if __name__ == "__main__":
    main()
