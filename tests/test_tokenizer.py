import json

import pytest
from conftest import SPM_PATH, TIKTOKEN_PATH

from titan_lite.data.chat_templates import build_chat_template
from titan_lite.data.tokenizer import (
    LLAMA3_PATTERN,
    build_tokenizer,
    llama3_special_tokens,
    read_bpe_ranks,
)

TEXT = "In the beginning God created the heaven and the earth.\n  Ünïcode: 🙂, 1234567!"


@pytest.mark.parametrize("kind, path", [("tiktoken", TIKTOKEN_PATH), ("sentencepiece", SPM_PATH)])
def test_round_trip_and_bos_eos_options(kind, path):
    tok = build_tokenizer(kind, path)
    plain = tok.encode(TEXT, bos=False, eos=False)
    assert tok.decode(plain) == TEXT
    assert tok.encode(TEXT) == [tok.bos_id] + plain  # bos by default, no eos
    assert tok.encode(TEXT, bos=False, eos=True) == plain + [tok.eos_id]
    assert all(0 <= i < tok.vocab_size for i in plain)
    assert len(plain) < len(TEXT.encode())  # merges happened: fewer tokens than bytes


def test_tiktoken_has_llama3_special_tokens_after_the_ranks():
    tok = build_tokenizer("tiktoken", TIKTOKEN_PATH)
    n_ranks = len(read_bpe_ranks(TIKTOKEN_PATH))
    specials = llama3_special_tokens()
    assert len(specials) == 256 and len(set(specials)) == 256
    assert tok.vocab_size == n_ranks + 256 == 2256
    assert (tok.bos_id, tok.eos_id) == (n_ranks, n_ranks + 1)
    assert tok.special_ids["<|eot_id|>"] == n_ranks + 9  # 128009 in the real Llama 3 vocab
    assert specials[-1] == "<|reserved_special_token_250|>"
    assert tok.decode([tok.bos_id, tok.eos_id]) == "<|begin_of_text|><|end_of_text|>"


def test_special_token_text_in_a_document_is_plain_text():
    tok = build_tokenizer("tiktoken", TIKTOKEN_PATH)
    ids = tok.encode("a <|end_of_text|> b", bos=False)
    assert tok.eos_id not in ids and tok.decode(ids) == "a <|end_of_text|> b"


def test_llama2_style_sentencepiece_ids():
    tok = build_tokenizer("sentencepiece", SPM_PATH)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 2000)


def test_malformed_bpe_file_names_the_line(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_text("IQ== 0\nnot-base64!! 1\n")
    with pytest.raises(ValueError, match=r"bad.model:2: not a 'base64 rank' line"):
        build_tokenizer("tiktoken", str(bad))


@pytest.mark.slow
def test_shipped_test_tokenizers_rebuild_byte_identically(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, python_env

    subprocess.run([sys.executable, "scripts/build_test_tokenizers.py", str(tmp_path)], cwd=REPO,
                   env=python_env(), check=True, capture_output=True, timeout=300)
    for name, shipped in (("test_tiktoken.model", TIKTOKEN_PATH), ("test_spm.model", SPM_PATH)):
        assert (tmp_path / name).read_bytes() == open(shipped, "rb").read(), name


# --- tokenizers given as a Hugging Face tokenizer.json, or found in a model folder ----------

# Scripts, accents, emoji, digits, tabs and CRLF: what a byte-level BPE must map byte-exactly.
MULTILINGUAL = ("In the beginning God created the heaven and the earth.\n  Ünïcode: 🙂, 1234567!"
                " Grüße aus Köln; 東京は晴れ; Привет, мир; नमस्ते; مرحبا; it's\t\ttabs\r\nand "
                "   spaces   ")


def tiktoken_json(path) -> str:
    """The shipped tiktoken test tokenizer written out as transformers writes Llama 3's."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    TikTokenConverter(vocab_file=TIKTOKEN_PATH, pattern=LLAMA3_PATTERN,
                      extra_special_tokens=llama3_special_tokens()).converted().save(str(path))
    return str(path)


def sentencepiece_json(path, spm_path: str = SPM_PATH) -> str:
    """A sentencepiece model written out as Hugging Face's Llama 2 tokenizer.json: its pieces,
    every split of a piece into two pieces as a merge (ordered by the piece's score, as
    transformers' converter does), byte fallback and the Metaspace pre-tokenizer."""
    import sentencepiece
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    normal = {p for p, i in vocab.items()
              if not (sp.is_unknown(i) or sp.is_control(i) or sp.is_byte(i))}
    merges = sorted(((-sp.get_score(vocab[p]), vocab[p[:k]], vocab[p[k:]]), (p[:k], p[k:]))
                    for p in normal for k in range(1, len(p))
                    if p[:k] in normal and p[k:] in normal)
    hf = HFTokenizer(models.BPE(vocab, [m for _, m in merges], unk_token="<unk>",
                                byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                           for i in range(sp.vocab_size()) if sp.is_control(i)
                           or sp.is_unknown(i)])
    hf.save(str(path))
    return str(path)


def trained_byte_level_json(path) -> str:
    """A GPT-2-style byte-level BPE trained here on the KJV sample plus multilingual text."""
    from conftest import CORPUS
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in open(CORPUS)][:40] + [MULTILINGUAL] * 20
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1500, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.save(str(path))
    return str(path)


def hf_ids(json_path: str, text: str) -> list[int]:
    """The `tokenizers` library's ids, special-token text read as text (as documents are)."""
    from tokenizers import Tokenizer as HFTokenizer

    reference = HFTokenizer.from_file(json_path)
    reference.encode_special_tokens = True
    return reference.encode(text, add_special_tokens=False).ids


def held_out_texts() -> list[str]:
    from conftest import CORPUS

    return [MULTILINGUAL] + [json.loads(line)["text"] for line in open(CORPUS)][40:140]


@pytest.mark.parametrize("make, engine", [(tiktoken_json, "tiktoken"),
                                          (sentencepiece_json, "sentencepiece"),
                                          (trained_byte_level_json, None)])
def test_tokenizer_json_gives_the_tokenizers_librarys_ids(tmp_path, make, engine):
    """Ids equal to the `tokenizers` library's reading of the same file (and, for the shipped
    tokenizers, to their own engine's) on multilingual and held-out text; decode round trips."""
    path = make(tmp_path / "tokenizer.json")
    tok = build_tokenizer("auto", path)
    own = None if engine is None else build_tokenizer(engine, {"tiktoken": TIKTOKEN_PATH,
                                                             "sentencepiece": SPM_PATH}[engine])
    for text in held_out_texts():
        ids = tok.encode(text, bos=False)
        assert ids == hf_ids(path, text), text[:60]
        assert own is None or ids == own.encode(text, bos=False), text[:60]
        assert tok.decode(ids) == text
    if own is not None:  # same ids, specials and therefore chat template as its own engine
        assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (own.vocab_size, own.bos_id,
                                                            own.eos_id)
        assert type(build_chat_template("auto", tok)) is type(build_chat_template("auto", own))
    # also where Hugging Face's reading departs from the original engine's (sentencepiece adds
    # its dummy prefix before a leading space, which Hugging Face's Metaspace skips there)
    assert tok.encode(" leading", bos=False) == hf_ids(path, " leading")


def test_a_folder_is_searched_in_order_and_its_tokenizer_config_names_eos(tmp_path):
    """original/tokenizer.model, tokenizer.model, tokenizer.json; the kind from the contents."""
    import shutil

    shutil.copy(SPM_PATH, tmp_path / "tokenizer.model")
    sentencepiece_json(tmp_path / "tokenizer.json")
    tok = build_tokenizer("auto", str(tmp_path))
    assert tok.files == [str(tmp_path / "tokenizer.model")] and tok.vocab_size == 2000
    assert build_tokenizer("huggingface", str(tmp_path)).files[0].endswith("tokenizer.json")
    (tmp_path / "original").mkdir()
    shutil.copy(TIKTOKEN_PATH, tmp_path / "original" / "tokenizer.model")
    llama3 = build_tokenizer("auto", str(tmp_path))
    assert llama3.vocab_size == 2256 and llama3.eos_id == llama3.special_ids["<|end_of_text|>"]
    assert build_tokenizer("sentencepiece", str(tmp_path)).vocab_size == 2000
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin_of_text|>"}, "eos_token": "<|eot_id|>"}))
    instruct = build_tokenizer("tiktoken", str(tmp_path))
    assert instruct.eos_id == instruct.special_ids["<|eot_id|>"]  # as an instruct model's
    assert instruct.files[-1].endswith("tokenizer_config.json")  # token caches key on it


def test_a_folder_without_a_tokenizer_and_unsupported_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"has no tokenizer \(looked for original/tokenizer"
                                         r".model, tokenizer.model, tokenizer.json\)"):
        build_tokenizer("auto", str(tmp_path))
    spec = json.loads(open(tiktoken_json(tmp_path / "t.json")).read())
    (tmp_path / "broken.json").write_text(json.dumps({**spec, "model": {"type": "Nonesuch"}}))
    with pytest.raises(ValueError, match=r"broken.json: not a tokenizer.json the tokenizers "
                                         r"library can read \(.+\)$"):
        build_tokenizer("auto", str(tmp_path / "broken.json"))


def test_bos_and_eos_under_other_names_come_from_tokenizer_config(tmp_path):
    """A tokenizer.json whose control tokens have names the reader does not guess is refused
    until a tokenizer_config.json beside it names them."""
    spec = json.loads(open(trained_byte_level_json(tmp_path / "t.json")).read())
    for token in spec["added_tokens"]:
        token["content"] = "<|fim|>"
    spec["model"]["vocab"]["<|fim|>"] = spec["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer.json: no bos/eos token .*name them "
                                         r"\(bos_token, eos_token\) in a tokenizer_config.json"):
        build_tokenizer("auto", str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|fim|>", "eos_token": "<|fim|>", "pad_token": None}))
    tok = build_tokenizer("auto", str(tmp_path))
    assert tok.bos_id == tok.eos_id == spec["model"]["vocab"]["<|fim|>"]


def built_tokenizer(path, pre_tokenizer, normalizer=None, byte_fallback=False) -> str:
    """A BPE trained here with the `tokenizers` library, with this pre-tokenizer (and
    normalizer), plus special and non-special added tokens."""
    from conftest import CORPUS
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    texts = [json.loads(line)["text"] for line in open(CORPUS)][:40] + [MULTILINGUAL] * 20
    hf = HFTokenizer(models.BPE(unk_token=None if byte_fallback else "<unk>",
                                byte_fallback=byte_fallback))
    hf.pre_tokenizer = pre_tokenizer
    hf.normalizer = normalizer
    byte_level = isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) or (
        isinstance(pre_tokenizer, pre_tokenizers.Sequence) and "ByteLevel" in repr(
            pre_tokenizer.__getstate__()))
    hf.decoder = decoders.ByteLevel() if byte_level else (
        decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
        if byte_fallback else decoders.Metaspace())
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level else []
    specials = ["<s>", "</s>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] * byte_fallback
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, special_tokens=specials,
                                                      initial_alphabet=alphabet))
    hf.add_tokens([AddedToken("LORD", special=False)])  # a non-special added token
    hf.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    hf.save(str(path))
    return str(path)


def _pre_tokenizers():
    from tokenizers import normalizers, pre_tokenizers

    return {
        "digits+bytelevel": (pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), None, False),
        "bytelevel": (pre_tokenizers.ByteLevel(add_prefix_space=True), None, False),
        "split+bytelevel": (pre_tokenizers.Sequence([
            pre_tokenizers.Split(r"\p{N}{1,3}| ?\p{L}+|\s+", behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), None, False),
        "metaspace+bytefallback": (pre_tokenizers.Metaspace(), None, True),
        "whitespace+nfkc": (pre_tokenizers.WhitespaceSplit(), normalizers.NFKC(), False),
    }


@pytest.mark.parametrize("kind", ["digits+bytelevel", "bytelevel", "split+bytelevel",
                                  "metaspace+bytefallback", "whitespace+nfkc"])
def test_every_tokenizer_json_reads_as_the_library_reads_it(tmp_path, kind):
    """Qwen's Digits + ByteLevel, GPT-2's ByteLevel with a prefix space, Split + ByteLevel,
    sentencepiece-style Metaspace with byte fallback, a normalizer: the library's ids (special
    tokens in the text stay text), added non-special tokens split out, bos/eos found."""
    pre, norm, byte_fallback = _pre_tokenizers()[kind]
    path = built_tokenizer(tmp_path / "tokenizer.json", pre, norm, byte_fallback)
    tok = build_tokenizer("auto", str(tmp_path))
    assert (tok.bos_id, tok.eos_id) == (tok.token_id("<s>"), tok.token_id("</s>"))
    for text in [*held_out_texts()[:20], "the LORD said 12345 <|im_end|> ok", "Ω≈ç√∫ 🙂"]:
        assert tok.encode(text, bos=False) == hf_ids(path, text), text[:60]
    ids = tok.encode("the LORD <|im_end|>", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.token_id("LORD") in ids  # the added token is split out as Hugging Face does
    assert tok.special_ids["<|im_end|>"] not in ids  # written by a user: plain text
    assert tok.vocab_size == tok.special_ids["<|im_end|>"] + 1
    if byte_fallback:  # a character the vocabulary lacks goes through its bytes and back
        assert tok.decode(tok.encode("Ω≈ç√∫", bos=False)) == "Ω≈ç√∫"


@pytest.mark.parametrize("kind", ["tiktoken", "sentencepiece", "huggingface"])
def test_batch_encoding_equals_one_document_at_a_time(tmp_path, kind):
    """encode_batch (the engines' threads; what the pretraining cache uses) gives each
    document's encode, bos and eos included."""
    if kind == "huggingface":
        pre, norm, byte_fallback = _pre_tokenizers()["digits+bytelevel"]
        path = str(built_tokenizer(tmp_path / "tokenizer.json", pre, norm, byte_fallback))
    else:
        path = TIKTOKEN_PATH if kind == "tiktoken" else SPM_PATH
    tok = build_tokenizer(kind, path)
    texts = [*held_out_texts()[:50], "", " leading space", "<|im_end|> 12345"]
    for bos, eos in ((True, True), (False, False)):
        assert tok.encode_batch(texts, bos, eos) == [tok.encode(t, bos, eos) for t in texts]
