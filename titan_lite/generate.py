"""Answer prompts with a job's model: its newest checkpoint, a step-N, or a Hugging Face folder.

    python -m titan_lite.generate --config train_configs/debug_sft.toml --chat \\
        --prompt "What is the first word of this verse? ..." --max_new_tokens 32

Bare ``--key value`` options are ``[generation]`` keys (prompt, chat, system, max_new_tokens,
temperature, top_k, top_p, seed, checkpoint); every other ``--section.key value`` overrides the
job's config as in training. One process, on CUDA when present (training.device), in
training.mixed_precision_param; with ``--chat`` and no prompt, an interactive chat on stdin.
"""

from __future__ import annotations

import sys

import torch

from titan_lite.config import JobConfig
from titan_lite.data import ChatTemplate, build_chat_template
from titan_lite.data.chat import Message
from titan_lite.data.tokenizer import Tokenizer, build_tokenizer
from titan_lite.inference.cli import answer_cli
from titan_lite.inference.generation import generate, prompt_ids, stop_ids
from titan_lite.inference.model import answer_device, load_model
from titan_lite.models.llama3 import Transformer


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


def main(argv: list[str] | None = None) -> None:
    answer_cli(run, argv, "titan_lite.generate", ("generation",))


if __name__ == "__main__":
    main()
