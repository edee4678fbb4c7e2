import pytest
from conftest import SPM_PATH, TIKTOKEN_PATH

from titan_lite.tokenizer import build_tokenizer, llama3_special_tokens, read_bpe_ranks

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
