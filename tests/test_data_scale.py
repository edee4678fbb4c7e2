"""Data at pretraining scale: every format streamed in parts, text cut where the ids cannot
change, caches built in parallel, resumed after a kill, shared by racing builders, and bad
inputs refused in one line naming the file."""

import gzip
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import CORPUS, REPO, SPM_PATH, TIKTOKEN_PATH, python_env

from titan_lite.data import tokenize_to_cache
from titan_lite.data.shards import Stream
from titan_lite.data.sources import PartReader, Piece, plan_parts
from titan_lite.data.tokenizer import build_tokenizer, safe_cut

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

DOCUMENTS = [json.loads(line)["text"] for line in open(CORPUS)]
SHARD_MB = 0.1  # ~20 parts of the 2 MB sample: every file is cut many times
# Whitespace and scripts where a careless cut changes the ids: runs of spaces, tabs and blank
# lines, CRLF, non-breaking and ideographic spaces, digits, a long unbroken word, accents.
ADVERSARIAL = "".join(
    f"Verse {i}:\t\t{'  ' * (i % 4)}And  God   said,\r\n\n\n   Let there be light{'!' * (i % 3)}"
    f"\u00a0and\u3000there was light 1234567 {'x' * (i % 50)}é\u0301 \n \n{' ' * (i % 9)}"
    f"{'abc' * 40 if i % 17 == 0 else ''}日本語のテキスト。 \t\n"
    for i in range(2000))


@pytest.fixture(scope="module")
def tiktoken():
    return build_tokenizer("tiktoken", TIKTOKEN_PATH)


def tokenizer_json(tmp_path_factory, kind: str) -> str:
    from test_jinja_templates import _hf_tokenizer
    from test_tokenizer import trained_byte_level_json

    folder = tmp_path_factory.mktemp(kind)
    if kind == "bytelevel":
        return trained_byte_level_json(folder / "tokenizer.json")
    hf = _hf_tokenizer(["<unk>", "<s>", "</s>"], "metaspace")
    hf.save(str(folder / "tokenizer.json"))
    return str(folder / "tokenizer.json")


@pytest.fixture(scope="module", params=["tiktoken", "sentencepiece", "bytelevel", "metaspace"])
def engine(request, tmp_path_factory):
    """(tokenizer, whole-text ids by the engine's own library in one call)."""
    if request.param == "tiktoken":
        tok = build_tokenizer("tiktoken", TIKTOKEN_PATH)
        return tok, tok.encoding.encode_ordinary
    if request.param == "sentencepiece":
        tok = build_tokenizer("sentencepiece", SPM_PATH)
        return tok, tok.model.encode
    from tokenizers import Tokenizer as HFTokenizer

    path = tokenizer_json(tmp_path_factory, request.param)
    reference = HFTokenizer.from_file(path)
    return build_tokenizer("huggingface", path), lambda text: reference.encode(
        text, add_special_tokens=False).ids


def cached_ids(cache: str) -> list[int]:
    return Stream(cache, "tokens", np.uint32).read().tolist()


def write_formats(folder, documents: list[str]) -> dict[str, str]:
    """The documents as .jsonl, .json (array), .jsonl.gz, .jsonl.zst and .parquet (in two
    row-group sizes), the same records in each."""
    folder.mkdir(exist_ok=True)
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents))
    paths = {fmt: str(folder / f"corpus{fmt}") for fmt in (".jsonl", ".json", ".jsonl.gz",
                                                            ".jsonl.zst", ".parquet")}
    open(paths[".jsonl"], "w").write(lines)
    json.dump([{"text": d} for d in documents], open(paths[".json"], "w"), indent=1)
    with gzip.open(paths[".jsonl.gz"], "wt") as fh:
        fh.write(lines)
    open(paths[".jsonl.zst"], "wb").write(zstandard.ZstdCompressor().compress(lines.encode()))
    table = pa.table({"id": list(range(len(documents))), "text": documents})
    pq.write_table(table, paths[".parquet"], row_group_size=97)
    return paths


def test_every_format_gives_the_ids_of_todays_jsonl_cache(tiktoken, tmp_path):
    """The shipped corpus in each format, cut into ~20 parts, equals bos + document + eos of
    every record, document after document (what the cache held before parts existed)."""
    expected = [id for d in DOCUMENTS for id in tiktoken.encode(d, bos=True, eos=True)]
    for fmt, path in write_formats(tmp_path / "src", DOCUMENTS).items():
        cache = tokenize_to_cache([path], tiktoken, cache_dir=str(tmp_path / "c"), log=None,
                                  shard_mb=SHARD_MB)
        assert cached_ids(cache) == expected, fmt
        if fmt in (".jsonl", ".parquet"):  # cut into parts; compressed files are one
            assert len(json.load(open(os.path.join(cache, "plan.json")))) >= 5


@pytest.mark.parametrize("text", ["\n".join(DOCUMENTS), ADVERSARIAL], ids=["kjv", "whitespace"])
def test_a_txt_cut_into_parts_and_pieces_gives_the_whole_documents_ids(engine, text, tmp_path):
    tok, whole = engine
    (tmp_path / "doc.txt").write_text(text, encoding="utf-8")
    cache = tokenize_to_cache([str(tmp_path / "doc.txt")], tok, cache_dir=str(tmp_path / "c"),
                              log=None, shard_mb=0.02)
    parts = json.load(open(os.path.join(cache, "plan.json")))
    assert len(parts) > 10  # cut many times
    assert cached_ids(cache) == [tok.bos_id] + whole(text) + [tok.eos_id]


def test_pieces_of_a_part_are_cut_where_the_ids_cannot_change(tiktoken, tmp_path):
    """Inside one part the text is read a MiB at a time and handed on in pieces; the pieces'
    ids, each encoded alone, are the whole text's."""
    (tmp_path / "doc.txt").write_text(ADVERSARIAL * 10)
    (part,) = plan_parts(str(tmp_path / "doc.txt"), 1 << 40)
    pieces = [piece for _, piece in PartReader(part, cut=lambda text, at: safe_cut(
        tiktoken, text, at))]
    assert len(pieces) >= 2 and all(isinstance(p, Piece) for p in pieces)
    assert "".join(p.text for p in pieces) == ADVERSARIAL * 10
    ids = [id for p in pieces for id in (tiktoken.encode(p.text, bos=False) if p.first
                                          else tiktoken.encode_continuation(p.text))]
    assert ids == tiktoken.encoding.encode_ordinary(ADVERSARIAL * 10)
    assert (pieces[0].first, pieces[-1].last) == (True, True)


def test_parallel_build_equals_serial_byte_for_byte(tiktoken, tmp_path):
    paths = write_formats(tmp_path / "src", DOCUMENTS)
    (tmp_path / "src" / "doc.txt").write_text(ADVERSARIAL)
    sources = [paths[".jsonl"], paths[".parquet"], str(tmp_path / "src" / "doc.txt")]
    caches = [tokenize_to_cache(sources, tiktoken, cache_dir=str(tmp_path / name), log=None,
                                shard_mb=SHARD_MB, workers=workers)
              for name, workers in (("serial", 1), ("parallel", 2))]
    serial, parallel = (sorted(_files(cache)) for cache in caches)
    assert [name for name, _ in serial] == [name for name, _ in parallel]
    assert all(a == b for (_, a), (_, b) in zip(serial, parallel))
    assert len(serial) > 20


def _files(cache: str) -> list[tuple[str, bytes]]:
    return [(os.path.join(os.path.basename(root), name), open(os.path.join(root, name),
                                                              "rb").read())
            for root, _, names in os.walk(cache) for name in names if name.startswith("tokens.")]


def _slow_build(sources, cache_dir, seconds_per_batch):
    """A builder in another process that sleeps after each batch (to be killed mid-way)."""
    import titan_lite.data.text as text

    encode = text.encode_documents

    def slow(tokenizer, batch):
        time.sleep(seconds_per_batch)
        return encode(tokenizer, batch)

    text.encode_documents = slow
    tok = build_tokenizer("tiktoken", TIKTOKEN_PATH)
    tokenize_to_cache(sources, tok, cache_dir=cache_dir, log=None, shard_mb=SHARD_MB)


def test_a_killed_build_resumes_from_its_finished_parts(tiktoken, tmp_path):
    source = write_formats(tmp_path / "src", DOCUMENTS)[".jsonl"]
    child = multiprocessing.get_context("fork").Process(
        target=_slow_build, args=([source], str(tmp_path / "c"), 0.2))
    child.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(_parts_done(tmp_path / "c")) < 3:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    done = _parts_done(tmp_path / "c")
    assert len(done) >= 3
    before = {path: os.stat(path).st_mtime_ns for path in done}
    messages = []
    cache = tokenize_to_cache([source], tiktoken, cache_dir=str(tmp_path / "c"),
                              log=messages.append, shard_mb=SHARD_MB)
    assert all(os.stat(path).st_mtime_ns == mtime for path, mtime in before.items())  # kept
    fresh = tokenize_to_cache([source], tiktoken, cache_dir=str(tmp_path / "fresh"), log=None,
                              shard_mb=SHARD_MB)
    assert cached_ids(cache) == cached_ids(fresh)
    assert not [n for n in os.listdir(cache) if ".tmp" in n or n.endswith(".claim")]


def _parts_done(folder) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
            if name == "tokens.uint32" and ".tmp" not in root]


def test_two_racing_builders_leave_one_valid_cache(tiktoken, tmp_path):
    source = write_formats(tmp_path / "src", DOCUMENTS)[".jsonl"]
    context = multiprocessing.get_context("fork")
    builders = [context.Process(target=_slow_build, args=([source], str(tmp_path / "c"), 0.02))
                for _ in range(2)]
    for builder in builders:
        builder.start()
    for builder in builders:
        builder.join(120)
    assert [builder.exitcode for builder in builders] == [0, 0]
    (cache,) = [os.path.join(tmp_path / "c", n) for n in os.listdir(tmp_path / "c")]
    expected = [id for d in DOCUMENTS for id in tiktoken.encode(d, bos=True, eos=True)]
    assert cached_ids(cache) == expected
    assert not [n for n in os.listdir(cache) if ".tmp" in n or n.endswith(".claim")]


def _bad_parquet(path, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=2)


@pytest.mark.parametrize("name, write, message", [
    ("a.parquet", lambda p: _bad_parquet(p, body=["a", "b"]),
     r"a.parquet: no column 'text' \(columns: body\)"),
    ("a.parquet", lambda p: _bad_parquet(p, text=["a", "b", "c", None]),
     r"a.parquet: row group 1, row 1: expected a record with a 'text' string .*got NoneType"),
    ("a.parquet", lambda p: _bad_parquet(p, text=[1, 2, 3]),
     r"a.parquet: row group 0, row 0: expected a record with a 'text' string .*got int"),
    ("a.parquet", lambda p: open(p, "wb").write(b"PAR1 not really"),
     r"a.parquet: not a Parquet file pyarrow can read"),
    ("a.jsonl.gz", lambda p: open(p, "wb").write(gzip.compress(b'{"text": "a"}\n' * 5000)[:-40]
                                                 ), r"a.jsonl.gz: cannot be read"),
    ("a.jsonl.gz", lambda p: open(p, "wb").write(b"\x1f\x8b\x08\x00garbage"),
     r"a.jsonl.gz: cannot be read"),
    ("a.jsonl.zst", lambda p: open(p, "wb").write(zstandard.ZstdCompressor().compress(
        b'{"text": "a"}\n' * 5000)[:-9]), r"a.jsonl.zst: cannot be read"),
    ("a.jsonl.zst", lambda p: open(p, "wb").write(zstandard.ZstdCompressor().compress(
        b'{"text": "a"}\n{"text": 5}\n')), r"a.jsonl.zst:2: expected .*'text' string"),
])
def test_bad_inputs_are_named_in_one_line_and_leave_no_cache(tiktoken, tmp_path, name, write,
                                                              message):
    path = str(tmp_path / name)
    write(path)
    with pytest.raises(ValueError, match=message) as error:
        tokenize_to_cache([path], tiktoken, cache_dir=str(tmp_path / "c"), log=None)
    assert "\n" not in str(error.value)
    left = os.listdir(tmp_path / "c") if os.path.exists(tmp_path / "c") else []
    assert [n for n in left if not n.endswith(".error")] == []


def test_prepare_builds_ahead_of_time_and_refuses_bad_data_with_exit_2(tmp_path):
    source = write_formats(tmp_path / "src", DOCUMENTS[:200])[".parquet"]
    common = ["--data.cache_dir", str(tmp_path / "c"), "--tokenizer.path", TIKTOKEN_PATH,
              "--data.shard_mb", "0.02"]
    done = subprocess.run([sys.executable, "-m", "titan_lite.data", "prepare", "--data.paths",
                           source, *common], cwd=REPO, env=python_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "training data: " in done.stdout and "tokens in" in done.stdout
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    bad = subprocess.run([sys.executable, "-m", "titan_lite.data", "prepare", "--data.paths",
                          str(tmp_path / "bad.jsonl"), *common], cwd=REPO, env=python_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.jsonl'}:2: expected a record with a 'text' string "
        "(data.text_field), got no 'text' field"]


def _source(tmp_path, index: int, rows: int) -> str:
    """A raw token file of ``rows`` rows of 8 (+1), its tokens telling its source apart."""
    path = tmp_path / f"source{index}.u32"
    (index * 100_000 + np.arange(rows * 8 + 1, dtype=np.uint32)).tofile(path)
    return str(path)


def test_a_mixture_draws_by_weight_covers_every_row_and_resumes_exactly(tmp_path):
    from titan_lite.data import PackedDataLoader, TextRows
    from titan_lite.data.mixture import MixedRows

    sizes, weights = [50, 400, 30], [1.0, 2.0, 1.0]
    sources = [TextRows(_source(tmp_path, i, n), seq_len=8) for i, n in enumerate(sizes)]
    mixture = MixedRows(sources, weights, ["a", "b", "c"])
    # every row at least once: the largest rows/share (400 rows at a half) sets 800 rows
    assert mixture.counts.tolist() == [200, 400, 200] and mixture.num_rows == 800
    first_tokens = mixture.batch(np.arange(800)).inputs[:, 0].numpy()
    source = first_tokens // 100_000
    assert np.bincount(source).tolist() == [200, 400, 200]
    for s, size in enumerate(sizes):  # each row of each source drawn, small ones repeated
        assert len(np.unique(first_tokens[source == s])) == size
    assert "b 50.0% (400 rows from 400, x1.00)" in mixture.report

    def loader():
        return PackedDataLoader(mixture, batch_size=4, dp_rank=0, dp_size=1, seed=7)

    run = loader()
    drawn = np.concatenate([run.next_batch().inputs[:, 0].numpy() for _ in range(150)])
    shares = np.bincount(drawn // 100_000, minlength=3) / len(drawn)
    assert np.allclose(shares, [0.25, 0.5, 0.25], atol=0.06)
    state = run.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    for _ in range(60):  # across the epoch's end
        assert torch.equal(run.next_batch().inputs, resumed.next_batch().inputs)


def test_a_job_with_data_weights_builds_a_cache_per_source(tmp_path):
    from titan_lite.config import load_config
    from titan_lite.data import build_data

    paths = [write_formats(tmp_path / name, DOCUMENTS[:n])[fmt]
             for name, n, fmt in (("a", 300, ".parquet"), ("b", 60, ".jsonl.zst"))]
    cfg = load_config(["--config", os.path.join(REPO, "train_configs/debug_model.toml"),
                       "--data.paths", ",".join(paths), "--data.weights", "3,1",
                       "--data.cache_dir", str(tmp_path / "c"), "--tokenizer.path",
                       TIKTOKEN_PATH, "--training.seq_len", "64"])
    logs = []
    data = build_data(cfg, build_tokenizer("tiktoken", TIKTOKEN_PATH), 0, 0, 1, logs.append)
    assert len([n for n in os.listdir(tmp_path / "c") if n.endswith(".tokens")]) == 2
    report = next(line for line in logs if line.startswith("training data: mixture"))
    assert "75.0%" in report and "25.0%" in report
    assert data.train.next_batch().inputs.shape == (cfg.training.local_batch_size, 64)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _train_on_nodes(tmp_path, name: str, source: str, cache_dirs: list[str]) -> list[float]:
    """Losses of a 2-rank job: one torchrun agent with 2 ranks, or two agents (``--nnodes 2``,
    c10d rendezvous on localhost, as scripts/multinode_slurm.sh starts them) with one each,
    agent i caching the data in cache_dirs[i]."""
    nodes = len(cache_dirs)
    dump = tmp_path / name
    rendezvous = ["--nnodes", str(nodes), "--nproc-per-node", str(2 // nodes),
                  "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{_free_port()}",
                  "--rdzv-id", name]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "titan_lite.runtime.launch", *rendezvous, "-m", "titan_lite.train",
         "--config", "train_configs/debug_model.toml", "--data.paths", source,
         "--data.cache_dir", cache_dir, "--tokenizer.path", TIKTOKEN_PATH,
         "--training.seq_len", "32", "--training.steps", "3", "--training.local_batch_size", "2",
         "--lr_scheduler.warmup_steps", "1", "--metrics.cpu_peak_tflops", "1",
         "--job.dump_folder", str(dump)],
        cwd=REPO, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cache_dir in cache_dirs]
    outputs = [agent.communicate(timeout=240)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0] * nodes, outputs
    records = [json.loads(line) for line in open(dump / "metrics" / "rank0.jsonl")]
    return [record["loss"] for record in records if "loss" in record]


@pytest.mark.slow
def test_two_nodes_on_localhost_train_as_one_with_shared_or_own_data_folders(tmp_path):
    source = write_formats(tmp_path / "src", DOCUMENTS[:400])[".parquet"]
    one_node = _train_on_nodes(tmp_path, "one", source, [str(tmp_path / "c1")])
    shared = _train_on_nodes(tmp_path, "shared", source, [str(tmp_path / "c2")] * 2)
    own = _train_on_nodes(tmp_path, "own", source, [str(tmp_path / "c3"), str(tmp_path / "c4")])
    assert len(one_node) == 3
    torch.testing.assert_close(shared, one_node, rtol=0, atol=1e-5)
    torch.testing.assert_close(own, one_node, rtol=0, atol=1e-5)
    for folder in ("c2", "c3", "c4"):  # one complete cache in each folder, nothing left over
        (cache,) = os.listdir(tmp_path / folder)
        assert sorted(n for n in os.listdir(tmp_path / folder / cache)
                      if not n.startswith("part-")) == ["manifest.json", "plan.json"]


def test_a_large_json_array_is_streamed_with_its_line_numbers(tmp_path):
    """A JSON array of ~4 MB is read a MiB at a time: every record (numbers that straddle a
    window's end included) at the line it starts on, and an error deep in it named by line."""
    from titan_lite.data.sources import records

    items = [{"text": "é" * (i % 300), "n": 10**15 + i} for i in range(12_000)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items, indent=1, ensure_ascii=False))  # 4 lines a record
    read = list(records(str(path)))
    assert [item for _, item in read] == items
    assert [location for location, _ in read][-1] == f"{path}:{2 + 4 * (len(items) - 1)}"
    broken = json.dumps(items, indent=1, ensure_ascii=False).replace(
        f'"n": {10**15 + 11_000}', '"n": nope')
    path.write_text(broken)
    with pytest.raises(ValueError, match=rf"a.json:{2 + 4 * 11_000 + 2}: invalid JSON"):
        list(records(str(path)))


@pytest.mark.parametrize("data_format", ["alpaca", "chat"])
def test_instruction_records_in_parquet_and_zst_give_the_samples_of_jsonl(tiktoken, tmp_path,
                                                                          data_format):
    """Alpaca and chat records as published (Parquet: a messages column of structs), read in
    parts by two workers, give the samples of the same records in JSON lines."""
    from titan_lite.data import tokenize_samples_to_cache
    from titan_lite.data.chat import Llama3Template
    from titan_lite.data.instruct import Rendering

    sft = [json.loads(line) for line in open(os.path.join(REPO, "titan_lite/assets/data/"
                                                          "kjv_sft.jsonl"))][:600]
    if data_format == "chat":
        sft = [{"messages": [{"role": "user", "content": r["instruction"] + "\n" + r["input"]},
                             {"role": "assistant", "content": r["output"]}]} for r in sft]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pq.write_table(pa.Table.from_pylist(sft), tmp_path / "a.parquet", row_group_size=50)
    open(tmp_path / "a.jsonl.zst", "wb").write(zstandard.ZstdCompressor().compress(
        (tmp_path / "a.jsonl").read_bytes()))
    rendering = Rendering(data_format, Llama3Template(tiktoken), False)
    arrays = []
    for name in ("a.jsonl", "a.parquet", "a.jsonl.zst"):
        cache = tokenize_samples_to_cache([str(tmp_path / name)], rendering,
                                          str(tmp_path / "c"), log=None, workers=2,
                                          shard_mb=0.01)
        arrays.append([Stream(cache, array, dtype).read().tolist() for array, dtype in (
            ("tokens", np.uint32), ("targets", np.uint8), ("lengths", np.uint32))])
    assert arrays[0] == arrays[1] == arrays[2]
    assert len(arrays[0][2]) == 600


def test_a_missing_reader_library_says_how_to_install_it(tiktoken, tmp_path, monkeypatch):
    source = write_formats(tmp_path / "src", DOCUMENTS[:20])
    for module, fmt in (("pyarrow", ".parquet"), ("zstandard", ".jsonl.zst")):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
        with pytest.raises(ValueError, match=rf"corpus{fmt}: reading this format needs "
                           rf"{module} \(pip install 'titan_lite\[data\]'"):
            tokenize_to_cache([source[fmt]], tiktoken, cache_dir=str(tmp_path / "c"),
                              log=None)


def test_progress_counts_the_bytes_of_each_format_read(tmp_path):
    """PartReader.done (what progress and the ETA count) climbs through the part's size, in
    compressed bytes for compressed files, not in decompressed characters."""
    noisy = [f"{d} {os.urandom(1500).hex()}" for d in DOCUMENTS]  # > 1 MiB compressed
    paths = write_formats(tmp_path / "src", noisy)
    for fmt in (".jsonl.gz", ".jsonl.zst", ".jsonl", ".parquet", ".json"):
        (part,) = plan_parts(paths[fmt], 1 << 40)
        reader = PartReader(part)
        seen = []
        for _ in reader:
            seen.append(reader.done)
        assert seen == sorted(seen) and 0 < seen[len(seen) // 2] < part.size, fmt
        assert part.size * 0.9 <= reader.done <= part.size, fmt  # once all is read
