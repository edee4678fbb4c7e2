"""titan_lite as a model of EleutherAI's lm-evaluation-harness, registered as ``titan_lite``.

Importing this module registers the model (lm-eval's command line does not load third-party
models: use ``python -m titan_lite.evaluate``, or from Python
``lm_eval.simple_evaluate(model="titan_lite", model_args="config=JOB.toml,checkpoint=step-100")``
after ``import titan_lite.inference.harness``). Requests are answered as the harness's own
Hugging Face backend answers them: the same tokenization of context and continuation (a context
starts with bos; an empty one is bos alone), the same rolling windows for perplexities, greedy
generation until a stop text, the tokenizer's eos or ``max_gen_toks``. Needs the ``eval`` extra.
"""

from __future__ import annotations

import bisect
import itertools
import os
from collections.abc import Iterator
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from titan_lite.config import Generation, JobConfig, expand_bare_keys, load_config
from titan_lite.data import ChatTemplate, build_chat_template
from titan_lite.inference.model import answer_device, load_model
from titan_lite.inference.generation import generate_batch
from titan_lite.models.llama3 import Transformer
from titan_lite.data.tokenizer import Tokenizer, build_tokenizer

Request = tuple[tuple[str, str], list[int], list[int]]  # (context, continuation), their ids


@register_model("titan_lite")
class TitanLiteLM(TemplateLM):
    """A titan_lite model answering the harness's requests in batches of ``batch_size``."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, device: torch.device,
                 batch_size: int = 8, max_gen_toks: int = 256,
                 template: ChatTemplate | None = None):
        """``template``: the chat template ``apply_chat_template`` renders requests in."""
        super().__init__()
        self.model, self.tok, self._device = model.eval(), tokenizer, device
        self.batch_size, self.max_gen_toks = int(batch_size), max_gen_toks
        self.max_length = model.args.max_seq_len
        self.template = template
        self._rendered: dict[str, list[int]] = {}  # chat prompt text -> the template's ids
        self._sorted: list[str] = []  # its texts in order (found by bisection)
        self._shortest = 0

    @classmethod
    def from_job(cls, cfg: JobConfig, batch_size: int = 8) -> TitanLiteLM:
        """The job's model with the weights ``[generation] checkpoint`` names (as generate)."""
        device = answer_device(cfg)
        tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
        try:  # (only used with apply_chat_template; a base model may have none)
            template = build_chat_template(cfg.data.chat_template, tokenizer,
                                           cfg.tokenizer.path)
        except ValueError:
            template = None
        return cls(load_model(cfg, tokenizer, device), tokenizer, device, batch_size,
                   template=template)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> TitanLiteLM:
        """``config=JOB.toml`` plus any config key (``checkpoint=step-100``: a [generation]
        key; ``training.seq_len=4096``), as lm-eval's ``--model_args`` passes them."""
        args = lm_utils.simple_parse_args_string(arg_string)
        if "config" not in args:
            raise ValueError("model_args: name the job, config=JOB.toml")
        argv = ["--config", str(args.pop("config"))]
        for key, value in args.items():
            argv += [f"--{key}", str(value)]
        batch_size = (additional_config or {}).get("batch_size") or 8
        return cls.from_job(load_config(expand_bare_keys(argv, ("generation",))),
                            int(batch_size))

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        """A text's ids after bos; a prompt ``apply_chat_template`` rendered (and the text
        the harness appends to it) as the template's own ids, control tokens included."""
        chat = self._chat_ids(string)
        if chat is not None:
            return chat
        bos = add_special_tokens is not False and self.tok.bos_id is not None
        return self.tok.encode(string, bos=bos, eos=False)

    def _chat_ids(self, string: str) -> list[int] | None:
        """The ids of a rendered chat prompt, of one with text appended (the continuation),
        or of one whose trailing white space the harness moved to the continuation; None for
        other text."""
        if string in self._rendered:
            return self._rendered[string]
        if len(self._sorted) != len(self._rendered):
            self._sorted = sorted(self._rendered)
            self._shortest = min(map(len, self._sorted))
        # A prompt the string extends sorts before it, and every prompt in between extends
        # that prompt: once the text shared with the string is shorter than any prompt, stop.
        shared, at = len(string), bisect.bisect_left(self._sorted, string)
        for text in map(self._sorted.__getitem__, range(at - 1, -1, -1)):
            if string.startswith(text):
                return self._rendered[text] + self.tok.encode(string[len(text):], bos=False)
            shared = min(shared, len(os.path.commonprefix([text, string])))
            if shared < self._shortest:
                break
        # a prompt the string is cut from sorts right after it
        for text in itertools.islice(self._sorted, at, None):
            if not text.startswith(string):
                break
            if text[len(string):].isspace():
                ids = self._rendered[text]
                for end in range(len(ids) - 1, 0, -1):  # (the white space's own tokens off)
                    if self.tok.decode(ids[:end]) == string:
                        return ids[:end]
        return None

    @property
    def tokenizer_name(self) -> str:
        return self.tok.files[0] if self.tok.files else "titan_lite"

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.template.describe if self.template is not None else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The conversation in the job's chat template, up to the assistant's answer (lm-eval's
        ``--apply_chat_template``): returned as text, its ids kept for ``tok_encode``."""
        if self.template is None:
            raise ValueError("apply_chat_template: no chat template for this tokenizer (set "
                             "data.chat_template)")
        if not add_generation_prompt:
            raise ValueError("apply_chat_template: tasks that prefill the assistant's answer "
                             "(gen_prefix) are not supported yet")
        ids = self.template.prompt(list(chat_history))
        text = self.tok.decode(ids)
        self._rendered[text] = ids
        return text

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Per request: the continuation's summed log-probability after its context (the
        last max_length + 1 tokens of both), and whether greedy decoding would produce it."""
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for batch in self._batches(range(len(requests)),
                                   key=lambda i: -len(requests[i][1] + requests[i][2])):
            rows = [(requests[i][1] + requests[i][2])[-(self.max_length + 1):] for i in batch]
            targets = [requests[i][2] for i in batch]
            for i, scored in zip(batch, self._score(rows, targets)):
                results[i] = scored
        return results

    @torch.no_grad()
    def _score(self, rows: list[list[int]], targets: list[list[int]]
               ) -> Iterator[tuple[float, bool]]:
        inputs = [row[:-1] for row in rows]
        width, span = max(map(len, inputs)), max(map(len, targets))
        # right padding: a causal model's positions before it never see it
        tokens = torch.tensor([row + [0] * (width - len(row)) for row in inputs],
                              device=self.device)
        # each row's continuation positions, the last ``span`` up to its own end (only those
        # are projected: batch x width x vocab logits would dwarf the model on big vocabularies)
        ends = torch.tensor([len(row) for row in inputs], device=self.device)
        index = (ends[:, None] - span + torch.arange(span, device=self.device)).clamp(min=0)

        def head(hidden: torch.Tensor, project: Any) -> torch.Tensor:
            picked = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
            return project(picked)

        logprobs = self.model(tokens, head=head).float().log_softmax(-1)
        for row, target in enumerate(targets):
            mine = logprobs[row, span - len(target):]
            wanted = torch.tensor(target, device=self.device)
            total = mine.gather(1, wanted[:, None]).sum()
            yield float(total), bool((mine.argmax(-1) == wanted).all())

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False
                              ) -> list[float]:
        """Each text's whole log-probability, in windows of max_length tokens (the harness's
        get_rolling_token_windows, as its Hugging Face backend)."""
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            for context, target in map(lm_utils.make_disjoint_window,
                                       lm_utils.get_rolling_token_windows(
                                           token_list=self.tok_encode(text),
                                           prefix_token=self.prefix_token_id,
                                           max_seq_len=self.max_length, context_len=1)):
                windows.append(((text, ""), context, target))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False
                       ) -> list[str]:
        """Greedy (or, with do_sample, sampled at the request's temperature) continuations,
        cut before the first of the request's ``until`` texts."""
        answers: list[str] = [""] * len(requests)
        by_settings: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            by_settings.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for members in by_settings.values():
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = Generation(max_new_tokens=int(kwargs.get("max_gen_toks",
                                                                self.max_gen_toks)),
                                  temperature=float(kwargs.get("temperature", 0.0))
                                  if kwargs.get("do_sample") else 0.0)
            room = self.max_length - sampling.max_new_tokens
            prompts = {i: self.tok_encode(requests[i].args[0])[-max(room, 1):] for i in members}
            for batch in self._batches(members, key=lambda i: -len(prompts[i])):
                out = generate_batch(
                    self.model, [prompts[i] for i in batch], sampling, {self.tok.eos_id},
                    self.device, finished=lambda row, ids: _cut(self.tok.decode(ids), until)
                    is not None)
                for i, generated in zip(batch, out):
                    text = self.tok.decode(generated.ids)
                    cut = _cut(text, until)
                    answers[i] = text if cut is None else text[:cut]
        return answers

    def _batches(self, indices: Any, key: Any) -> Iterator[list[int]]:
        """``indices`` sorted by ``key`` (longest first: similar lengths share a batch)."""
        ordered = sorted(indices, key=key)
        for first in range(0, len(ordered), self.batch_size):
            yield ordered[first:first + self.batch_size]


def _cut(text: str, until: list[str]) -> int | None:
    """Where the first stop text starts in ``text``; None when there is none."""
    found = [text.find(stop) for stop in until if stop and stop in text]
    return min(found) if found else None
