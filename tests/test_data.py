import json

import numpy as np
import pytest
import torch
from conftest import TIKTOKEN_PATH

from titan_lite.data import PackedDataLoader, TextRows, tokenize_to_cache
from titan_lite.data.shards import Stream
from titan_lite.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("tiktoken", TIKTOKEN_PATH)


@pytest.fixture
def corpus(tmp_path):
    docs = [f"Document number {i}. " + "And it was so. " * (i % 7 + 1) for i in range(200)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:150]))
    (tmp_path / "b.txt").write_text(docs[150])
    return tmp_path, docs[:151]


def test_tokenize_packs_documents_with_bos_and_eos_and_reuses_the_cache(tok, corpus, tmp_path):
    folder, docs = corpus
    messages = []
    cache = tokenize_to_cache([str(folder)], tok, cache_dir=str(tmp_path / "c"),
                              log=messages.append)
    tokens = Stream(cache, "tokens", np.uint32).read()
    expected = [i for d in docs for i in tok.encode(d, bos=True, eos=True)]
    assert tokens.tolist() == expected
    assert len(messages) == 1
    again = tokenize_to_cache([str(folder)], tok, cache_dir=str(tmp_path / "c"),
                              log=messages.append)
    assert again == cache and len(messages) == 1  # no second tokenization
    (folder / "b.txt").write_text("changed")
    assert tokenize_to_cache([str(folder)], tok, cache_dir=str(tmp_path / "c"),
                             log=messages.append) != cache


@pytest.mark.parametrize("name, content, message", [
    ("a.txt", b"In the beginning\nGod cr\xe9ated", r"a.txt:2: not UTF-8 text \(byte 0xe9"),
    ("a.jsonl", b'{"text": "a"}\n{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     r"a.jsonl:2: invalid JSON \(nested too deeply\)"),
    ("a.jsonl", b'{"text": "a"}\n{"text": "\xe9"}\n', r"a.jsonl:2: not UTF-8 text"),
])
def test_unreadable_text_is_named_by_file_and_line(tok, tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        tokenize_to_cache([str(tmp_path / name)], tok, cache_dir=str(tmp_path / "c"),
                          log=lambda m: None)


def test_bad_jsonl_line_is_named(tok, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a record with a 'text'"):
        tokenize_to_cache([str(tmp_path / "bad.jsonl")], tok, cache_dir=str(tmp_path / "c"),
                          log=None)


def make_loader(path, dp_rank=0, dp_size=1, batch=2, seed=0, shuffle=True):
    return PackedDataLoader(TextRows(path, seq_len=8), batch_size=batch, dp_rank=dp_rank,
                            dp_size=dp_size, seed=seed, shuffle=shuffle)


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "t.u32"
    np.arange(1001, dtype=np.uint32).tofile(path)  # 125 samples of 8 (+1 shifted target)
    return str(path)


def test_samples_are_contiguous_windows_with_shifted_labels(token_file):
    loader = make_loader(token_file, shuffle=False)
    batch = loader.next_batch()
    inputs, labels = batch.inputs, batch.labels
    assert batch.positions is None  # documents attend to each other, as in pretraining
    assert inputs.tolist() == [list(range(0, 8)), list(range(8, 16))]
    assert labels.tolist() == [list(range(1, 9)), list(range(9, 17))]


def test_ranks_see_disjoint_samples_that_cover_the_epoch(token_file):
    seen = []
    for rank in range(3):
        loader = make_loader(token_file, dp_rank=rank, dp_size=3, batch=4)
        for _ in range(loader.batches_per_epoch):
            seen += [row[0] // 8 for row in loader.next_batch().inputs.tolist()]
    assert len(seen) == len(set(seen)) == 3 * (125 // 3 // 4) * 4


def test_order_is_deterministic_per_seed_and_changes_each_epoch(token_file):
    a, b, c = make_loader(token_file), make_loader(token_file), make_loader(token_file, seed=1)
    first = [a.next_batch().inputs for _ in range(a.batches_per_epoch)]
    assert all((x == b.next_batch().inputs).all() for x in first)
    assert not all((x == c.next_batch().inputs).all() for x in first)
    second_epoch = [a.next_batch().inputs for _ in range(a.batches_per_epoch)]
    assert a.epoch == 1
    assert not all((x == y).all() for x, y in zip(first, second_epoch))


def test_state_restore_gives_the_identical_next_batch(token_file):
    loader = make_loader(token_file, dp_rank=1, dp_size=2)
    for _ in range(loader.batches_per_epoch + 3):  # into the second epoch
        loader.next_batch()
    state = loader.state_dict()
    expected = loader.next_batch()
    resumed = make_loader(token_file, dp_rank=1, dp_size=2)
    resumed.load_state_dict(state)
    got = resumed.next_batch()
    assert (got.inputs == expected.inputs).all() and (got.labels == expected.labels).all()
    with pytest.raises(ValueError, match="resume with the same global batch size"):
        make_loader(token_file, batch=5).load_state_dict(state)  # 12 % 5


def test_state_resumes_the_same_global_batches_with_another_number_of_ranks(token_file):
    """2 ranks x 2 sequences save; 1 rank x 4 sequences resumes with the same samples."""
    two = [make_loader(token_file, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(5):
        for loader in two:
            loader.next_batch()
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # every rank agrees on the job's position
    next_two = torch.cat([loader.next_batch().inputs for loader in two])
    one = make_loader(token_file, batch=4)
    one.load_state_dict(state)
    next_one = one.next_batch().inputs
    assert sorted(map(tuple, next_two.tolist())) == sorted(map(tuple, next_one.tolist()))


def test_corpus_too_small_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.u32"
    np.arange(10, dtype=np.uint32).tofile(path)
    with pytest.raises(ValueError, match="data set too small: 10 tokens make 1 rows"):
        make_loader(str(path))
