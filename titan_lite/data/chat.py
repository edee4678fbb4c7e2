"""Instruction records -> messages -> token ids plus a target mask, in the model's chat format.

Records: Alpaca ``{"instruction", "input"?, "output"}``, chat ``{"messages": [{"role",
"content"}]}`` and ShareGPT ``{"conversations": [{"from", "value"}]}``. Formats: Llama 3
(header and end-of-turn control tokens, as Meta's reference ``ChatFormat`` encodes a dialog),
Llama 2 (``[INST] ... [/INST]`` with ``<<SYS>>``, as Meta's ``chat_completion`` does) and
ChatML (``<|im_start|>role ... <|im_end|>``: Qwen, SmolLM2 and many others).
Message text is always encoded as plain text: a user typing ``<|eot_id|>`` gets those
characters, never the control token. Which template a job uses, and a checkpoint's own Jinja
template: data/chat_templates.py.
"""

from __future__ import annotations

from typing import Any, Protocol

from titan_lite.data.tokenizer import Tokenizer

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _text(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise ValueError(f"field {key!r} missing")
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} is not a string")
    return value


def alpaca_messages(record: Any) -> list[Message]:
    """An Alpaca record as one user turn (instruction, then the input if any) and the answer."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object with 'instruction' and 'output'")
    if "instruction" not in record and ("messages" in record or "conversations" in record):
        raise ValueError("field 'instruction' missing: this is a chat record "
                         "(use data.format = \"chat\")")
    instruction, extra = _text(record, "instruction"), _text(record, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": _text(record, "output")}]


def chat_messages(record: Any) -> list[Message]:
    """A chat record's turns: OpenAI-style ``messages`` or ShareGPT ``conversations``."""
    if isinstance(record, dict) and "messages" in record:
        turns, role_key, text_key, roles = record["messages"], "role", "content", {
            r: r for r in ROLES}
        field = "messages"
    elif isinstance(record, dict) and "conversations" in record:
        turns, role_key, text_key, roles = (record["conversations"], "from", "value",
                                            SHAREGPT_ROLES)
        field = "conversations"
    elif isinstance(record, dict) and "instruction" in record:
        raise ValueError("field 'messages' missing: this is an Alpaca record "
                         "(use data.format = \"alpaca\")")
    else:
        raise ValueError("expected a JSON object with 'messages' (or ShareGPT 'conversations')")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"field {field!r} is not a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise ValueError(f"{where} is not an object")
        role = turn.get(role_key)
        if role not in roles:
            raise ValueError(f"{where}.{role_key}: unknown role {role!r} (expected one of "
                             f"{', '.join(map(repr, roles))})")
        try:
            content = _text(turn, text_key)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        messages.append({"role": roles[role], "content": content})
    return messages


def record_messages(record: Any, data_format: str) -> list[Message]:
    """The messages of one record of ``data_format`` ('alpaca' or 'chat'); ValueError says
    which field is wrong. A record must hold at least one assistant answer to learn from."""
    messages = alpaca_messages(record) if data_format == "alpaca" else chat_messages(record)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn from this record")
    return messages


class ChatTemplate(Protocol):
    """How a conversation becomes token ids."""

    stop_ids: set[int]  # ids that end an assistant turn in generation
    tokenizer: Tokenizer
    name: str  # what the token cache is keyed on
    describe: str  # which template, and why it was chosen (for the log)

    def render(self, messages: list[Message], train_on_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        """(ids, is_target): the whole conversation; targets are the assistant turns with
        their end-of-turn token (every token but the first with ``train_on_prompt``)."""
        ...

    def prompt(self, messages: list[Message]) -> list[int]:
        """The conversation so far followed by the start of the assistant's reply."""
        ...


class Llama3Template:
    """``<|begin_of_text|>`` then per message ``<|start_header_id|>role<|end_header_id|>\\n\\n
    content<|eot_id|>``; content stripped, pieces encoded separately, as Meta's ChatFormat."""

    CONTROL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>")
    name = describe = "llama3"

    def __init__(self, tokenizer: Tokenizer):
        specials = tokenizer.special_ids
        missing = [t for t in self.CONTROL if t not in specials]
        if missing:
            raise ValueError(f"data.chat_template: 'llama3' needs Llama 3's control tokens, and "
                             f"this tokenizer lacks {', '.join(missing)} (use 'llama2')")
        self.tokenizer = tokenizer
        self.bos, self.start_header, self.end_header, self.eot = (
            specials[t] for t in ("<|begin_of_text|>", "<|start_header_id|>",
                                  "<|end_header_id|>", "<|eot_id|>"))
        self.stop_ids = {self.eot, specials["<|end_of_text|>"]}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _header(self, role: str) -> list[int]:
        return [self.start_header, *self._encode(role), self.end_header, *self._encode("\n\n")]

    def render(self, messages: list[Message], train_on_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        ids, is_target = [self.bos], [False]
        for message in messages:
            header = self._header(message["role"])
            body = [*self._encode(message["content"].strip()), self.eot]
            learn = train_on_prompt or message["role"] == "assistant"
            ids += header + body
            is_target += [train_on_prompt] * len(header) + [learn] * len(body)
        return ids, is_target

    def prompt(self, messages: list[Message]) -> list[int]:
        ids, _ = self.render(messages)
        return ids + self._header("assistant")


class Llama2Template:
    """Per exchange ``<s>[INST] user [/INST] answer </s>``; a system prompt goes inside the first
    user turn as ``<<SYS>>\\n...\\n<</SYS>>\\n\\n``, as Meta's chat_completion."""

    B_INST, E_INST = "[INST]", "[/INST]"
    name = describe = "llama2"
    B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = {tokenizer.eos_id}

    def _exchanges(self, messages: list[Message]) -> list[tuple[str, str | None]]:
        """(user, answer) pairs; the last answer is None when the conversation ends with the
        user. ValueError unless the turns alternate user / assistant after one system prompt."""
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            # (the system prompt keeps its own whitespace, as in Meta's chat_completion)
            first = {"role": "user", "content": self.B_SYS + messages[0]["content"]
                     + self.E_SYS + messages[1]["content"]}
            messages = [first, *messages[2:]]
        for i, message in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if message["role"] != expected:
                raise ValueError(f"Llama 2 chats alternate user and assistant turns (after an "
                                 f"optional system prompt); turn {i} is {message['role']!r}")
        users = [m["content"] for m in messages[::2]]
        answers = [m["content"] for m in messages[1::2]]
        return list(zip(users, answers + [None] * (len(users) - len(answers))))

    def _user(self, text: str) -> list[int]:
        return self.tokenizer.encode(f"{self.B_INST} {text.strip()} {self.E_INST}", bos=True,
                                     eos=False)

    def render(self, messages: list[Message], train_on_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        is_target: list[bool] = []
        for user, answer in self._exchanges(messages):
            prompt = self._user(user)
            ids += prompt
            is_target += [False] + [train_on_prompt] * (len(prompt) - 1)
            if answer is not None:
                # The separate encode's leading "▁" is the space after [/INST]; the trailing
                # space is Meta's too.
                reply = self.tokenizer.encode(f"{answer.strip()} ", bos=False, eos=True)
                ids += reply
                is_target += [True] * len(reply)
        return ids, is_target

    def prompt(self, messages: list[Message]) -> list[int]:
        exchanges = self._exchanges(messages)
        if exchanges[-1][1] is not None:
            raise ValueError("the conversation must end with a user message to be answered")
        ids, _ = self.render(messages)
        return ids


class ChatMLTemplate:
    """Per message ``<|im_start|>role\ncontent<|im_end|>\n``, content as given (ChatML
    templates do not trim), no bos; the targets are the assistant contents and their
    ``<|im_end|>``. Control tokens by id, text pieces encoded separately."""

    CONTROL = ("<|im_start|>", "<|im_end|>")
    name = describe = "chatml"

    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in self.CONTROL if t not in tokenizer.special_ids]
        if missing:
            raise ValueError(f"data.chat_template: 'chatml' needs the control tokens "
                             f"{', '.join(self.CONTROL)}, and this tokenizer lacks "
                             f"{', '.join(missing)}")
        self.tokenizer = tokenizer
        self.start, self.end = (tokenizer.special_ids[t] for t in self.CONTROL)
        self.stop_ids = {self.end, tokenizer.eos_id}

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, bos=False, eos=False)

    def _header(self, role: str) -> list[int]:
        return [self.start, *self._encode(f"{role}\n")]

    def render(self, messages: list[Message], train_on_prompt: bool = False
               ) -> tuple[list[int], list[bool]]:
        ids: list[int] = []
        is_target: list[bool] = []
        for message in messages:
            header, newline = self._header(message["role"]), self._encode("\n")
            body = [*self._encode(message["content"]), self.end]
            learn = train_on_prompt or message["role"] == "assistant"
            ids += header + body + newline
            is_target += ([train_on_prompt] * len(header) + [learn] * len(body)
                          + [train_on_prompt] * len(newline))
        return ids, is_target

    def prompt(self, messages: list[Message]) -> list[int]:
        ids, _ = self.render(messages)
        return ids + self._header("assistant")
