"""Decoding with a KV cache: greedy, or temperature / top-k / top-p sampling with a seed.

Used by ``python -m titan_lite.generate`` and by the trainer's validation samples. Every rank of
a sharded model runs the same decode (same logits, same seeded choices), so the number of
forwards, and with it FSDP's collectives, agree across ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from titan_lite.config import Generation
from titan_lite.data.chat import ChatTemplate, Message
from titan_lite.runtime.distributed import full_tensor
from titan_lite.models.llama3.attention import KVCache
from titan_lite.data.tokenizer import Tokenizer


def choose_next(logits: torch.Tensor, cfg: Generation, generator: torch.Generator) -> int:
    """The next token from one position's logits (vocab,): argmax at temperature 0, else a
    draw from the temperature-scaled distribution cut to the top k and the top-p nucleus."""
    if cfg.temperature == 0:
        return int(logits.argmax())
    logits = logits.float().cpu() / cfg.temperature  # CPU: the same draw on every device
    if cfg.top_k > 0:
        kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token while the mass before it is below p (the most likely is always kept)
        outside = sorted_probs.cumsum(0) - sorted_probs >= cfg.top_p
        probs = probs.scatter(0, order[outside], 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class Generated:
    ids: list[int]  # the new tokens, without the stop token
    seconds: float  # wall time of the decode (after the prompt's prefill)
    prefill_seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.ids) / self.seconds if self.seconds > 0 else 0.0


@torch.no_grad()
def generate(model: nn.Module, prompt: list[int], cfg: Generation, stop_ids: set[int],
             device: torch.device, use_cache: bool = True) -> Generated:
    """Continue ``prompt`` for up to ``cfg.max_new_tokens`` tokens or until a stop id, within
    the model's max_seq_len. ``use_cache`` false re-runs the whole prefix for every token
    (a reference for tests)."""
    max_len = model.args.max_seq_len
    if len(prompt) >= max_len:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model takes at most "
                         f"{max_len - 1} before its first answer token (model max_seq_len)")
    generator = torch.Generator().manual_seed(cfg.seed)
    cache = KVCache(max_len) if use_cache else None
    ids = list(prompt)
    start = time.perf_counter()
    logits = model(torch.tensor([ids], device=device), cache=cache)
    prefill = time.perf_counter() - start
    new: list[int] = []
    while len(new) < cfg.max_new_tokens and len(ids) < max_len:
        token = choose_next(full_tensor(logits)[0, -1], cfg, generator)
        if token in stop_ids:
            break
        new.append(token)
        ids.append(token)
        step_input = [[token]] if use_cache else [ids]
        logits = model(torch.tensor(step_input, device=device), cache=cache)
    return Generated(new, time.perf_counter() - start - prefill, prefill)


def _last_logits(hidden: torch.Tensor, project) -> torch.Tensor:
    return project(hidden[:, -1:])


@torch.no_grad()
def generate_batch(model: nn.Module, prompts: list[list[int]], cfg: Generation,
                   stop_ids: set[int], device: torch.device, pad_id: int = 0,
                   finished: Callable[[int, list[int]], bool] | None = None
                   ) -> list[Generated]:
    """``generate`` for several prompts at once: left-padded into one batch whose pad
    positions are never attended to (each row keeps its own positions), one KV cache; a row
    that finishes leaves the batch, so it costs no more compute. Each row's tokens are those
    ``generate`` gives its prompt alone (sampling draws from a generator per row, seeded as
    ``generate``'s). ``finished(prompt index, its new ids)`` true also ends a row, after that
    token (e.g. a stop text seen)."""
    max_len = model.args.max_seq_len
    lengths = [len(prompt) for prompt in prompts]
    if max(lengths) >= max_len:
        raise ValueError(f"a prompt has {max(lengths)} tokens; the model takes at most "
                         f"{max_len - 1} before its first answer token (model max_seq_len)")
    width = max(lengths)
    pads = torch.tensor([width - n for n in lengths], device=device)
    tokens = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    # room for the longest row plus every new token (a row never passes its own max_len)
    cache = KVCache(width + cfg.max_new_tokens, pads)
    generators = [torch.Generator().manual_seed(cfg.seed) for _ in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the prompts still in the batch, in its row order
    start = time.perf_counter()
    # (only the last position's logits: batch x prompt x vocab floats would dwarf the cache)
    logits = full_tensor(model(tokens, cache=cache, head=_last_logits))[:, -1]
    prefill = time.perf_counter() - start
    while True:
        going, inputs = [], []
        for row, index in enumerate(active):
            token = choose_next(logits[row], cfg, generators[index])
            if token in stop_ids:
                continue
            new[index].append(token)
            if finished is not None and finished(index, new[index]):
                continue
            if len(new[index]) < cfg.max_new_tokens and lengths[index] + len(new[index]) < max_len:
                going.append(row)
                inputs.append(token)
        if not going:
            break
        if len(going) < len(active):
            cache.keep(torch.tensor(going, device=device))
            active = [active[row] for row in going]
        logits = full_tensor(model(torch.tensor(inputs, device=device)[:, None],
                                   cache=cache))[:, -1]
    seconds = time.perf_counter() - start - prefill
    return [Generated(ids, seconds, prefill) for ids in new]


def prompt_ids(text: str, tokenizer: Tokenizer, template: ChatTemplate | None,
               history: list[Message] | None = None, system: str = "") -> list[int]:
    """``text`` as a prompt: a user turn after ``history`` (and a system prompt) in the chat
    template, or plain text after bos without one."""
    if template is None:
        return tokenizer.encode(text, bos=True, eos=False)
    messages = ([{"role": "system", "content": system}] if system else []) + list(history or [])
    return template.prompt(messages + [{"role": "user", "content": text}])


def stop_ids(tokenizer: Tokenizer, template: ChatTemplate | None) -> set[int]:
    return set(template.stop_ids) if template is not None else {tokenizer.eos_id}
