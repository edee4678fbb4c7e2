"""Tokenizers and chat formats against references nobody here wrote, shipped in PyPI packages:
Meta's Llama 3 tokenizer file, ``Tokenizer`` and ``ChatFormat`` (``llama-models``), and
Mistral's sentencepiece tokenizer files and tokenizer (``mistral-common``)."""

import json
import os
import pathlib

import pytest

from titan_lite.data.chat import Llama3Template
from titan_lite.data.tokenizer import build_tokenizer

llama3 = pytest.importorskip("llama_models.llama3")
mistral_common = pytest.importorskip("mistral_common")

# Scripts, accents, emoji, digits, whitespace runs, and special-token text in a document.
TEXTS = ["In the beginning God created the heaven and the earth.",
         "  Ünïcode: 🙂, 1234567! Grüße aus Köln; 東京は晴れ; Привет, мир; नमस्ते; مرحبا",
         "it's\t\ttabs\r\nand   spaces   \n\n\nend", "<|eot_id|> is text here, [INST] too",
         "x" * 5000 + " " * 3000 + "y"]


@pytest.fixture(scope="module")
def meta():
    from llama_models.llama3.tokenizer import Tokenizer

    path = os.path.join(os.path.dirname(llama3.__file__), "tokenizer.model")
    return path, Tokenizer(pathlib.Path(path))


def test_llama3_tokenizer_model_gives_metas_ids(meta):
    path, reference = meta
    tok = build_tokenizer("auto", path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (128256, 128000, 128001)
    for text in TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids == reference.encode(text, bos=True, eos=True), text[:40]
        assert tok.decode(ids[1:-1]) == reference.decode(ids[1:-1]) == text


def test_llama3_template_gives_metas_chat_format_ids_and_masks(meta):
    """A multi-turn dialog with a system prompt: ids of ChatFormat.encode_dialog_prompt (and
    of its messages), targets exactly the assistant contents and their <|eot_id|>. (Content
    without surrounding white space: llama-models 0.3 no longer strips it, Meta's first
    ChatFormat and Hugging Face's Llama 3 templates do, and so does titan_lite.)"""
    from llama_models.datatypes import RawMessage, StopReason
    from llama_models.llama3.chat_format import ChatFormat

    path, reference = meta
    chat_format = ChatFormat(reference)
    dialog = [("system", "You answer briefly."), ("user", "Who said, Let there be light?"),
              ("assistant", "God said it."), ("user", "And what was made on day two?"),
              ("assistant", "The firmament.\n\nAnd it was good.")]
    raw = [RawMessage(role=role, content=content, stop_reason=StopReason.end_of_turn
                      if role == "assistant" else None) for role, content in dialog]
    expected, targets = [reference.special_tokens["<|begin_of_text|>"]], [False]
    for message in raw:
        tokens, _ = chat_format.encode_message(message, None)
        header = len(chat_format._encode_header(message.role))
        expected += tokens
        targets += [False] * header + [message.role == "assistant"] * (len(tokens) - header)
    template = Llama3Template(build_tokenizer("auto", path))
    messages = [{"role": role, "content": content} for role, content in dialog]
    ids, is_target = template.render(messages)
    assert ids == expected and is_target == targets
    assert template.prompt(messages[:-1]) == chat_format.encode_dialog_prompt(raw[:-1]).tokens


@pytest.mark.parametrize("name", ["tokenizer.model.v1",
                                  "mistral_instruct_tokenizer_240323.model.v3"])
def test_mistral_sentencepiece_files_give_mistrals_ids(name):
    from mistral_common.tokens.tokenizers.sentencepiece import SentencePieceTokenizer

    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", name)
    reference = SentencePieceTokenizer(path)
    tok = build_tokenizer("auto", path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (reference.n_words, reference.bos_id,
                                                        reference.eos_id)
    for text in TEXTS:
        assert tok.encode(text, bos=True, eos=True) == reference.encode(text, bos=True,
                                                                        eos=True), text[:40]
        assert tok.decode(tok.encode(text, bos=False)) == reference.decode(
            reference.encode(text, bos=False, eos=False))


# The user / assistant branches of Mistral 7B Instruct v0.3's template (its tool branches
# left out), as that checkpoint's tokenizer_config.json ships them beside "legacy": false.
MISTRAL_V3_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + message['content'] + '[/INST]' }}{%- elif message['role'] == "
    "'assistant' %}{{- ' ' + message['content']|trim + eos_token }}{%- endif %}{%- endfor %}")


def test_mistral_v3_jinja_template_gives_mistral_commons_ids(tmp_path):
    """The v3 sentencepiece file (its [INST] / [/INST] are control pieces) in a folder with the
    template: the generation prompt equals mistral-common's encode_chat_completion, and the
    answer's targets are its tokens through </s>."""
    import shutil

    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from titan_lite.data.chat_templates import JinjaTemplate, build_chat_template

    source = os.path.join(os.path.dirname(mistral_common.__file__), "data",
                          "mistral_instruct_tokenizer_240323.model.v3")
    shutil.copy(source, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "legacy": False,
        "chat_template": MISTRAL_V3_TEMPLATE}))
    turns = [("user", "Who said, Let there be light?"), ("assistant", "God said it. "),
             ("user", " And what was made on the second day?")]
    classes = {"user": UserMessage, "assistant": AssistantMessage}
    reference = MistralTokenizer.from_file(source)  # (its suffix names the version)
    expected = reference.encode_chat_completion(ChatCompletionRequest(
        messages=[classes[role](content=text) for role, text in turns])).tokens
    tok = build_tokenizer("auto", str(tmp_path))
    template = build_chat_template("auto", tok, str(tmp_path))
    assert isinstance(template, JinjaTemplate)
    messages = [{"role": role, "content": text} for role, text in turns]
    assert template.prompt(messages) == expected
    ids, is_target = template.render(messages[:2])
    first_answer = expected[expected.index(tok.special_ids["[/INST]"]) + 1:
                            expected.index(tok.eos_id) + 1]
    assert [i for i, t in zip(ids, is_target) if t] == first_answer
