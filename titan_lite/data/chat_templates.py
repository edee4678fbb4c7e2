"""Which chat template a job uses, and a checkpoint's own Jinja template.

``data.chat_template``: a named template (``llama3``, ``llama2``, ``chatml``; data/chat.py), a
path to a ``.jinja`` file, or ``auto``: the template the tokenizer's folder ships
(tokenizer_config.json's ``chat_template``, or chat_template.jinja) when there is one, else the
named template its control tokens call for. A Jinja template is rendered as transformers'
``apply_chat_template`` renders it (a sandboxed jinja2 environment with the same helpers and
variables) and its text tokenized with the template's control tokens as control ids, while
message contents stay plain text. The tokens learned are found by rendering the conversation up
to each assistant turn (with the generation prompt) and through it: the tokens in between are
the answer, up to and including its end-of-turn. Generation stops on the tokenizer's eos and on
every ``eos_token_id`` of the folder's config.json and generation_config.json.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from typing import Any

from titan_lite.data.chat import (
    ChatMLTemplate,
    ChatTemplate,
    Llama2Template,
    Llama3Template,
    Message,
)
from titan_lite.data.tokenizer import Tokenizer, special_pattern

NAMED = {t.name: t for t in (Llama3Template, Llama2Template, ChatMLTemplate)}
AUTO = "auto"
_TEMPLATE_FILE = "chat_template.jinja"
_TOKENIZER_CONFIG = "tokenizer_config.json"


class JinjaTemplate:
    """A Jinja chat template (a checkpoint's own, or a ``.jinja`` file) as a ChatTemplate.

    ``fallback`` names the template to suggest when this one cannot mark the answers (its
    renderings are not prefixes of each other); ``variables`` are the special-token texts the
    template may use (``bos_token``, ``eos_token``, ...), as tokenizer_config.json names them.
    """

    def __init__(self, source: str, origin: str, tokenizer: Tokenizer, stop_ids: set[int],
                 variables: dict[str, str], fallback: str):
        import jinja2

        self.tokenizer, self.origin, self.fallback = tokenizer, origin, fallback
        self.stop_ids = stop_ids
        # (what the answers' masks depend on: the text, its variables, the end-of-turn ids)
        key = json.dumps([source, variables, sorted(stop_ids)])
        self.name = f"jinja-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        self.describe = f"the Jinja template of {origin}"
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin}:{e.lineno}: not a Jinja template ({e.message})") from None
        self._variables = variables
        self._special_text = special_pattern(tokenizer.special_ids)

    def _text(self, messages: list[Message], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         tools=None, **self._variables)
        except Exception as e:  # the template's own code: raise_exception, undefined names...
            raise ValueError(f"the chat template of {self.origin} failed on this conversation: "
                             f"{type(e).__name__}: {e}") from None

    def _plain_spans(self, text: str, messages: list[Message]) -> list[tuple[int, int]]:
        """Where the contents that hold special-token text sit in ``text`` (searched in
        order, as given or stripped), so that they stay text."""
        spans, at = [], 0
        for i, message in enumerate(messages):
            content = message["content"]
            found = next(((start, len(piece)) for piece in (content, content.strip())
                          if piece and (start := text.find(piece, at)) >= 0), None)
            if found is not None:
                at = found[0] + found[1]
            if self._special_text is None or not self._special_text.search(content):
                continue
            if found is None:
                raise ValueError(f"message {i} holds the control-token text "
                                 f"{self._special_text.search(content).group()!r} and the "
                                 f"chat template of {self.origin} rewrites that message, so it "
                                 "cannot be kept as plain text")
            spans.append((found[0], found[0] + found[1]))
        return spans

    def _ids(self, messages: list[Message], add_generation_prompt: bool
             ) -> tuple[str, list[int]]:
        text = self._text(messages, add_generation_prompt)
        return text, self.tokenizer.encode_with_specials(text, self._plain_spans(text, messages))

    def render(self, messages: list[Message], train_on_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        text, ids = self._ids(messages, add_generation_prompt=False)
        if train_on_prompt:
            return ids, [False] + [True] * (len(ids) - 1)
        is_target = [False] * len(ids)
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before_text, before = self._ids(messages[:turn], add_generation_prompt=True)
            through_text, through = ((text, ids) if turn == len(messages) - 1
                                     else self._ids(messages[:turn + 1], False))
            self._check_prefix(before_text, through_text, turn, "up to it with the generation "
                                                                "prompt")
            self._check_prefix(through_text, text, turn, "through it")
            # The texts only append; the tokens may differ where a merge crosses the boundary
            # (the answer then starts with that token).
            answer = range(_common_length(before, ids), _common_length(through, ids))
            end = next((i for i in answer if ids[i] in self.stop_ids), answer.stop - 1)
            for i in range(answer.start, end + 1):
                is_target[i] = True
        return ids, is_target

    def _check_prefix(self, head: str, whole: str, turn: int, what: str) -> None:
        if not whole.startswith(head):
            raise ValueError(
                f"the chat template of {self.origin} is not prefix-stable: the conversation "
                f"rendered {what} (assistant message {turn}) is not the start of its longer "
                "rendering, so the answer cannot be told from the prompt; set "
                f"data.chat_template = {self.fallback!r}, or give a .jinja template whose "
                "turns only append")

    def prompt(self, messages: list[Message]) -> list[int]:
        return self._ids(messages, add_generation_prompt=True)[1]


def _common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _environment():
    """The environment transformers renders chat templates in: sandboxed (templates are
    downloaded code), trim_blocks / lstrip_blocks, loop controls, JSON without HTML escaping,
    ``raise_exception``, ``strftime_now``, and the ``{% generation %}`` tag (which marks the
    answers for transformers' assistant mask; here the prefix diff finds them, so its body
    renders as it is)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(line)

        def _body(self, caller):
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None


def folder_template(folder: str, tokenizer_config: dict) -> tuple[str, str] | None:
    """(template source, where it came from) of a model folder: chat_template.jinja, or
    its tokenizer_config.json's ``chat_template`` (a string, or a list of named templates
    whose ``default`` is taken); None when it has neither."""
    path = os.path.join(folder, _TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path) as fh:
            return fh.read(), path
    config_path = os.path.join(folder, _TOKENIZER_CONFIG)
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str) and template.strip():
        return template, f"{config_path} (chat_template)"
    return None


def checkpoint_stop_ids(folder: str, tokenizer: Tokenizer) -> set[int]:
    """The ids that end a reply: the tokenizer's eos and every ``eos_token_id`` in the
    folder's config.json and generation_config.json (an int or a list)."""
    ids = {tokenizer.eos_id}
    for name in ("config.json", "generation_config.json"):
        found = _read_json(os.path.join(folder, name)).get("eos_token_id")
        ids.update(found if isinstance(found, list) else [] if found is None else [found])
    return ids


def _template_variables(config: dict, tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token, eos_token, unk_token, pad_token as tokenizer_config.json (``config``) names
    them (what transformers passes a template), else the tokenizer's own bos and eos."""
    names = {i: text for text, i in tokenizer.special_ids.items()}
    variables = {"bos_token": names.get(tokenizer.bos_id, ""),
                 "eos_token": names.get(tokenizer.eos_id, "")} if not config else {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[key] = value
    return variables


def named_for(tokenizer: Tokenizer) -> str:
    """The named template a tokenizer's control tokens call for: llama3 with Llama 3's header
    and end-of-turn tokens, chatml with <|im_start|> and <|im_end|>, else llama2."""
    return next((name for name in ("llama3", "chatml")
                 if all(t in tokenizer.special_ids for t in NAMED[name].CONTROL)), "llama2")


def build_chat_template(name: str, tokenizer: Tokenizer, tokenizer_path: str = ""
                        ) -> ChatTemplate:
    """The template ``data.chat_template`` names for this tokenizer, read from
    ``tokenizer_path`` (the tokenizer's folder, or its file in a folder). Its ``describe``
    says which one and why, for the log."""
    folder = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    stop_ids = checkpoint_stop_ids(folder, tokenizer) if tokenizer_path else {tokenizer.eos_id}
    config = _read_json(os.path.join(folder, _TOKENIZER_CONFIG)) if tokenizer_path else {}
    fallback = named_for(tokenizer)
    found, why = None, "data.chat_template"
    if name.endswith(".jinja"):
        with open(name) as fh:
            found = fh.read(), name
    elif name == AUTO and tokenizer_path:
        found, why = folder_template(folder, config), "auto: the checkpoint's own"
    if found is not None:
        template = JinjaTemplate(*found, tokenizer, stop_ids,
                                 _template_variables(config, tokenizer), fallback)
        template.describe += f" ({why})"
        return template
    if name == AUTO:
        name = fallback
        why = (f"auto: {folder or tokenizer_path or 'the tokenizer'} has no chat template, "
               f"and the tokenizer's control tokens call for {name}")
    if name not in NAMED:
        raise ValueError(f"data.chat_template: unknown template {name!r} (one of auto, "
                         f"{', '.join(NAMED)}, or a .jinja file)")
    template = NAMED[name](tokenizer)
    template.stop_ids = template.stop_ids | stop_ids
    template.describe = f"{name} ({why})"
    return template
