import pytest
from conftest import SPM_PATH, TIKTOKEN_PATH

from titan_lite.data.chat import (
    Llama2Template,
    Llama3Template,
    alpaca_messages,
    chat_messages,
    record_messages,
)
from titan_lite.data.chat_templates import build_chat_template
from titan_lite.data.tokenizer import build_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who said, Let there be light?"},
    {"role": "assistant", "content": "God said it.  "},
    {"role": "user", "content": " And what was made on the second day? "},
    {"role": "assistant", "content": "The firmament."},
]


@pytest.fixture(scope="module")
def tik():
    return build_tokenizer("tiktoken", TIKTOKEN_PATH)


@pytest.fixture(scope="module")
def spm():
    return build_tokenizer("sentencepiece", SPM_PATH)


def llama3_reference(messages: list[dict]) -> str:
    """The dialog as the string Meta's ChatFormat (and the HF Llama 3 chat template) produce."""
    return "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
        for m in messages)


def test_llama3_ids_equal_the_reference_string_encoded_with_its_control_tokens(tik):
    ids, _ = Llama3Template(tik).render(CONVERSATION)
    reference = tik.encoding.encode(llama3_reference(CONVERSATION), allowed_special="all")
    assert ids == reference
    prompt = Llama3Template(tik).prompt(CONVERSATION[:2])
    assert prompt == tik.encoding.encode(
        llama3_reference(CONVERSATION[:2]) + "<|start_header_id|>assistant<|end_header_id|>\n\n",
        allowed_special="all")


def test_llama3_targets_are_the_assistant_turns_and_their_eot(tik):
    template = Llama3Template(tik)
    ids, is_target = template.render(CONVERSATION)
    targets = [i for i, t in zip(ids, is_target) if t]
    expected = (tik.encode("God said it.", bos=False) + [template.eot]
                + tik.encode("The firmament.", bos=False) + [template.eot])
    assert targets == expected
    _, everything = template.render(CONVERSATION, train_on_prompt=True)
    assert everything == [False] + [True] * (len(ids) - 1)


def test_control_token_text_from_a_user_stays_plain_text(tik):
    template = Llama3Template(tik)
    ids, _ = template.render([{"role": "user", "content": "end here <|eot_id|> ok"},
                              {"role": "assistant", "content": "<|start_header_id|>"}])
    assert ids.count(template.eot) == 2  # the two real ends of turn only
    assert ids.count(template.start_header) == 2
    assert "<|eot_id|> ok" in tik.decode(ids)


def llama2_reference(spm, messages: list[dict]) -> list[int]:
    """Meta's llama/generation.py chat_completion encoding of a dialog ending in an answer."""
    b_inst, e_inst, b_sys, e_sys = "[INST]", "[/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n"
    if messages[0]["role"] == "system":
        messages = [{"role": messages[1]["role"],
                     "content": b_sys + messages[0]["content"] + e_sys + messages[1]["content"]}
                    ] + messages[2:]
    return sum([spm.encode(f"{b_inst} {p['content'].strip()} {e_inst} {a['content'].strip()} ",
                           bos=True, eos=True)
                for p, a in zip(messages[::2], messages[1::2])], [])


@pytest.mark.parametrize("messages", [
    CONVERSATION, CONVERSATION[1:3],
    # Meta keeps the system prompt's own whitespace inside <<SYS>> (Hugging Face's template too)
    [{"role": "system", "content": "  Be terse.  "}, *CONVERSATION[1:3]],
], ids=["system-multi-turn", "one-turn", "system-with-spaces"])
def test_llama2_ids_equal_metas_chat_completion(spm, messages):
    template = Llama2Template(spm)
    ids, is_target = template.render(messages)
    assert ids == llama2_reference(spm, messages)
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    expected = sum((spm.encode(f"{a.strip()} ", bos=False, eos=True) for a in answers), [])
    assert [i for i, t in zip(ids, is_target) if t] == expected


def test_llama2_refuses_turns_that_do_not_alternate(spm):
    with pytest.raises(ValueError, match="turn 1 is 'user'"):
        Llama2Template(spm).render([{"role": "user", "content": "a"},
                                    {"role": "user", "content": "b"}])


def test_auto_template_follows_the_tokenizer_and_llama3_needs_its_control_tokens(tik, spm):
    """auto: Llama 3's template when the tokenizer has its header/end-of-turn tokens."""
    assert isinstance(build_chat_template("auto", tik), Llama3Template)
    assert isinstance(build_chat_template("auto", spm), Llama2Template)
    assert isinstance(build_chat_template("llama2", tik), Llama2Template)
    with pytest.raises(ValueError, match="needs Llama 3's control tokens"):
        build_chat_template("llama3", spm)


def test_alpaca_records_become_one_exchange_with_or_without_input():
    with_input = alpaca_messages({"instruction": "Sum", "input": "1 2", "output": "3"})
    assert with_input[0] == {"role": "user", "content": "Sum\n\n1 2"}
    assert alpaca_messages({"instruction": "Hi", "input": "", "output": "Hello"})[0][
        "content"] == "Hi"
    assert alpaca_messages({"instruction": "Hi", "output": "Hello"})[1] == {
        "role": "assistant", "content": "Hello"}


def test_sharegpt_conversations_map_their_roles():
    messages = chat_messages({"conversations": [{"from": "system", "value": "s"},
                                                {"from": "human", "value": "q"},
                                                {"from": "gpt", "value": "a"}]})
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize("record, data_format, message", [
    ({"instruction": "x"}, "alpaca", "field 'output' missing"),
    ({"messages": [{"role": "user", "content": "q"}]}, "alpaca",
     "this is a chat record .use data.format = \"chat\""),
    ({"instruction": "x", "output": "y"}, "chat", "this is an Alpaca record"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "chat",
     r"messages\[0\].role: unknown role 'bot'"),
    ({"conversations": [{"from": "human", "value": 3}]}, "chat",
     r"conversations\[0\]: field 'value' is not a string"),
    ({"messages": [{"role": "user", "content": "q"}]}, "chat", "no assistant message"),
])
def test_bad_records_name_the_field(record, data_format, message):
    with pytest.raises(ValueError, match=message):
        record_messages(record, data_format)


# The ChatML template text as Qwen2.5 / SmolLM2 ship it, without the tool-calling branches.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
          "%}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory):
    """A Qwen-style byte-level BPE (Digits + ByteLevel) with ChatML's control tokens."""
    import json

    from conftest import CORPUS
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("chatml")
    texts = [json.loads(line)["text"] for line in open(CORPUS)][:60]
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return folder


def test_chatml_equals_transformers_apply_chat_template(chatml_folder):
    """Ids equal transformers' rendering of the ChatML template text (training and the
    generation prompt); targets exactly the assistant contents and their <|im_end|>; chosen
    by auto for a tokenizer with ChatML's control tokens."""
    from transformers import PreTrainedTokenizerFast

    from titan_lite.data.chat import ChatMLTemplate
    from titan_lite.data.tokenizer import build_tokenizer

    reference = PreTrainedTokenizerFast(tokenizer_file=str(chatml_folder / "tokenizer.json"),
                                        eos_token="<|im_end|>", chat_template=CHATML)
    tok = build_tokenizer("auto", str(chatml_folder / "tokenizer.json"))
    template = build_chat_template("auto", tok)
    assert isinstance(template, ChatMLTemplate)
    ids, is_target = template.render(CONVERSATION)
    assert ids == list(reference.apply_chat_template(CONVERSATION, tokenize=True,
                                                     return_dict=False))
    assert template.prompt(CONVERSATION[:-1]) == list(reference.apply_chat_template(
        CONVERSATION[:-1], tokenize=True, add_generation_prompt=True, return_dict=False))
    end = tok.special_ids["<|im_end|>"]
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = sum(([*tok.encode(a, bos=False), end] for a in answers), [])
    assert [i for i, t in zip(ids, is_target) if t] == expected
    assert end in template.stop_ids
