import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import REPO, TIKTOKEN_PATH

from titan_lite.data import PackedSamples, ValidationLoader, tokenize_samples_to_cache
from titan_lite.data.chat import Llama3Template
from titan_lite.data.instruct import Rendering
from titan_lite.data.shards import Stream
from titan_lite.data.sources import records as iter_records
from titan_lite.data.loader import split_indices
from titan_lite.loss import IGNORE_INDEX
from titan_lite.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer("tiktoken", TIKTOKEN_PATH)


def alpaca(i: int) -> dict:
    return {"instruction": f"Question {i}?", "input": "", "output": "yes " * (1 + i % 5)}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def cache_of(tok, path, tmp_path, data_format="alpaca", train_on_prompt=False) -> str:
    rendering = Rendering(data_format, Llama3Template(tok), train_on_prompt)
    return tokenize_samples_to_cache([path], rendering, str(tmp_path / "cache"),
                                     log=lambda m: None)


def test_rows_mask_prompts_and_restart_positions_at_every_sample(tok, tmp_path):
    records = [alpaca(i) for i in range(6)]
    cache = cache_of(tok, write_jsonl(tmp_path / "a.jsonl", records), tmp_path)
    samples = PackedSamples(cache, seq_len=64, overlong="drop")
    template = Llama3Template(tok)
    rendered = [template.render([{"role": "user", "content": r["instruction"]},
                                 {"role": "assistant", "content": r["output"]}])
                for r in records]
    batch = samples.batch(np.arange(samples.num_rows))
    at = {}  # row, then offset in it, of each sample in packing order
    row, offset = 0, 0
    for ids, _ in rendered:
        if offset + len(ids) - 1 > 64:
            row, offset = row + 1, 0
        at[len(at)] = (row, offset)
        offset += len(ids) - 1
    for index, (ids, is_target) in enumerate(rendered):
        r, o = at[index]
        n = len(ids) - 1
        assert batch.inputs[r, o:o + n].tolist() == ids[:-1]
        assert batch.positions[r, o:o + n].tolist() == list(range(n))
        expected = [t if keep else IGNORE_INDEX for t, keep in zip(ids[1:], is_target[1:])]
        assert batch.labels[r, o:o + n].tolist() == expected  # prompt and header ignored
    # every target is an answer token or eot; the next sample's bos is never a label
    targets = batch.labels[batch.labels != IGNORE_INDEX]
    assert template.bos not in targets.tolist()
    answer_ids = {i for r in records for i in tok.encode(r["output"].strip(), bos=False)}
    assert set(targets.tolist()) <= answer_ids | {template.eot}
    assert "packed into" in samples.report and "6 samples" in samples.report


def test_length_report_counts_and_overlong_handling(tok, tmp_path):
    records = [alpaca(i) for i in range(4)] + [
        {"instruction": "long " * 80, "output": "short"},
        {"instruction": "q", "output": "word " * 80}]
    cache = cache_of(tok, write_jsonl(tmp_path / "a.jsonl", records), tmp_path)
    dropped = PackedSamples(cache, seq_len=48, overlong="drop")
    assert len(dropped.spans) == 4
    assert "2 longer than training.seq_len 48" in dropped.report and "dropped 2" in dropped.report
    truncated = PackedSamples(cache, seq_len=48, overlong="truncate")
    # the long prompt leaves no answer within 49 tokens: dropped; the long answer is cut
    assert len(truncated.spans) == 5
    assert "truncated 2, dropped 1 left without an answer" in truncated.report
    assert max(length for _, length in truncated.spans) == 49
    lengths = Stream(cache, "lengths", np.uint32).read()
    p50 = int(np.percentile(lengths, 50).round())
    assert f"min {lengths.min()} / p50 {p50}" in dropped.report
    with pytest.raises(ValueError, match="none of the 6 samples fits training.seq_len 8"):
        PackedSamples(cache, seq_len=8, overlong="drop")


def test_cache_is_reused_and_keyed_on_what_changes_the_samples(tok, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(3)])
    first = cache_of(tok, path, tmp_path)
    assert cache_of(tok, path, tmp_path) == first
    assert cache_of(tok, path, tmp_path, train_on_prompt=True) != first


@pytest.mark.parametrize("content, data_format, message", [
    ('{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n', "alpaca",
     r"a.jsonl:3: field 'output' missing"),
    ('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c",\n  "inp": 1}\n]',
     "alpaca", r"a.jsonl:3: field 'output' missing"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}\n',
     "chat", r"a.jsonl:1: messages\[1\].role: unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "q"}]}\n', "alpaca",
     r"a.jsonl:1: .*use data.format = \"chat\""),
    ('{"instruction": "a", "output": "b"}\n{"oops"\n', "alpaca", r"a.jsonl:2: invalid JSON"),
    ("\n\n", "alpaca", r"data.paths: no records in"),
])
def test_bad_data_names_file_line_and_field_and_leaves_no_cache(tok, tmp_path, content,
                                                                 data_format, message):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(ValueError, match=message):
        cache_of(tok, str(tmp_path / "a.jsonl"), tmp_path, data_format)
    left = os.listdir(tmp_path / "cache") if os.path.exists(tmp_path / "cache") else []
    assert [name for name in left if not name.endswith(".sft.error")] == []  # no cache
    for name in left:  # only the message, for the other builders of a job to raise
        assert re.search(message, (tmp_path / "cache" / name).read_text())


NESTED = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize("content, message", [
    # a JSON array per line: every record read, or a refusal naming the line (never 1 of 3)
    (b'[{"instruction": "a", "output": "b"}]\n' * 3, r"a.jsonl:2: text after the JSON array"),
    (b'{"instruction": "a", "output": "b"}\n[{"instruction": "a", "output": "b"}]\n',
     r"a.jsonl:2: a record must be a JSON object, not an array"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": ' + NESTED + b', "output": "b"}\n',
     r"a.jsonl:2: invalid JSON \(nested too deeply\)"),
    (b'[{"instruction": "a", "output": "b"},\n {"instruction": ' + NESTED + b'}]',
     r"a.jsonl:2: invalid JSON \(nested too deeply\)"),
    (b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
     r"a.jsonl:2: not UTF-8 text \(byte 0xe9 at column 21\)"),
    (b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "b"}]',
     r"a.jsonl:2: not UTF-8 text \(byte 0xe9 at column 22\)"),
    (b'[{"instruction": "a", "output": "b"},\n\n {"instruction": }]',
     r"a.jsonl:3: invalid JSON \(Expecting value\)"),
])
def test_records_are_all_read_or_refused_naming_file_and_line(tok, tmp_path, content, message):
    (tmp_path / "a.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        cache_of(tok, str(tmp_path / "a.jsonl"), tmp_path)


def test_json_arrays_and_jsonl_read_alike(tmp_path):
    records = [alpaca(i) for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    write_jsonl(tmp_path / "b.jsonl", records)
    assert [r for _, r in iter_records(str(tmp_path / "a.json"))] == records
    assert [r for _, r in iter_records(str(tmp_path / "b.jsonl"))] == records


def test_split_is_deterministic_disjoint_and_complete():
    kept, held = split_indices(100, 0.1, seed=3)
    assert len(held) == 10 and sorted([*kept, *held]) == list(range(100))
    again_kept, again_held = split_indices(100, 0.1, seed=3)
    assert (held == again_held).all() and (kept == again_kept).all()
    assert not (split_indices(100, 0.1, seed=4)[1] == held).all()


def test_validation_batches_cover_every_row_once_with_the_same_count_on_every_rank(tok,
                                                                                  tmp_path):
    cache = cache_of(tok, write_jsonl(tmp_path / "a.jsonl", [alpaca(i) for i in range(40)]),
                     tmp_path)
    rows = PackedSamples(cache, seq_len=48, overlong="drop")
    loaders = [ValidationLoader(rows, batch_size=2, dp_rank=r, dp_size=3) for r in range(3)]
    batches = [list(loader) for loader in loaders]
    assert len({len(b) for b in batches}) == 1  # every rank runs the same number of forwards
    targets = sum(int((b.labels != IGNORE_INDEX).sum()) for rank in batches for b in rank)
    whole = rows.batch(np.arange(rows.num_rows))
    assert targets == int((whole.labels != IGNORE_INDEX).sum())
    assert len(list(ValidationLoader(rows, 2, 0, 3, max_batches=1))) == 1


def test_shipped_example_is_rebuilt_byte_for_byte(tmp_path):
    import runpy

    script = runpy.run_path(os.path.join(REPO, "scripts", "build_sft_example.py"))
    script["main"](str(tmp_path))
    for name in script["OUTPUTS"]:  # the records, the held-out ones, the harness task's
        shipped = os.path.join(REPO, "titan_lite", "assets", name)
        with open(shipped, "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name
    assert sum(1 for _ in open(tmp_path / script["OUTPUTS"][1])) == 150


def test_padding_rows_hold_no_targets(tok, tmp_path):
    cache = cache_of(tok, write_jsonl(tmp_path / "a.jsonl", [alpaca(1)]), tmp_path)
    batch = PackedSamples(cache, seq_len=64, overlong="drop").batch(np.array([0, -1]))
    assert (batch.labels[1] == IGNORE_INDEX).all()
    assert torch.equal(batch.positions[1], torch.arange(64))
