"""Preparing a pretraining corpus: MB/s, tokens/s and peak memory on one core and on all cores.

    python bench/bench_data.py [--gb 2] [--folder /tmp/titan_lite_bench_data] [--docs]

Writes the shipped KJV sample, repeated to ``--gb`` GB, as one ``.txt`` file, as JSON lines and
as Parquet (once; reused), then times ``python -m titan_lite.data prepare`` on each, end to end
(start-up and planning included), into a fresh cache every time, with the shipped 2,256-token
test tokenizer and Meta's 128k Llama 3 ``tokenizer.model`` (from the ``llama-models`` package):
on one core (``taskset`` to core 0, one process), on all cores with worker processes
(``data.workers`` = cores), and, for JSON lines, on all cores with one process and the
tokenizer's own batch threads. Memory is sampled every 0.2 s over the builder and its workers:
the largest process's resident set, and the sum of their proportional set sizes (PSS: pages the
forked workers share with the builder counted once). Last, the time from launching the trainer
to its first step with the Parquet corpus's prepared cache. Prints a Markdown table; with
``--docs`` also writes it into docs/data.md between the bench_data markers. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "titan_lite/assets/data/kjv_sample.jsonl")
SHIPPED = os.path.join(REPO, "titan_lite/assets/tokenizers/test_tiktoken.model")
MARKERS = ("<!-- bench_data table: start -->", "<!-- bench_data table: end -->")


def write_inputs(folder: str, gigabytes: float) -> dict[str, str]:
    """corpus.txt, corpus.jsonl and corpus.parquet of about ``gigabytes`` GB of text each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    texts = [json.loads(line)["text"] for line in open(CORPUS)]
    size = sum(len(t.encode()) + 1 for t in texts)
    repeats = max(1, round(gigabytes * 1e9 / size))
    paths = {name: os.path.join(folder, f"corpus.{name}") for name in ("txt", "jsonl", "parquet")}
    if not os.path.exists(paths["txt"]):
        with open(paths["txt"] + ".tmp", "w") as fh:
            for _ in range(repeats):
                fh.write("\n".join(texts) + "\n")
        os.replace(paths["txt"] + ".tmp", paths["txt"])
    if not os.path.exists(paths["jsonl"]):
        lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
        with open(paths["jsonl"] + ".tmp", "w") as fh:
            for _ in range(repeats):
                fh.write(lines)
        os.replace(paths["jsonl"] + ".tmp", paths["jsonl"])
    if not os.path.exists(paths["parquet"]):
        schema = pa.schema([("text", pa.string())])
        with pq.ParquetWriter(paths["parquet"] + ".tmp", schema) as writer:
            for _ in range(repeats):  # a row group per repeat: ~2 MB, streamed
                writer.write_table(pa.table({"text": texts}, schema=schema))
        os.replace(paths["parquet"] + ".tmp", paths["parquet"])
    return paths


def tokenizers() -> list[tuple[str, str]]:
    found = [("shipped 2k", SHIPPED)]
    try:
        import llama_models

        meta = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
        if os.path.exists(meta):
            found.append(("Llama 3 128k", meta))
    except ImportError:
        print("(llama-models not installed: the 128k Llama 3 tokenizer is skipped)")
    return found


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    pids = [pid]
    for child in subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                text=True).stdout.split():
        pids += _tree(int(child))
    return pids


def _memory(pid: int) -> tuple[int, int]:
    """(largest resident set, sum of proportional set sizes) of the tree, in bytes."""
    largest, pss = 0, 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                fields = dict(re.findall(r"^(\w+):\s+(\d+) kB", fh.read(), re.M))
        except OSError:
            continue
        largest = max(largest, int(fields.get("Rss", 0)) * 1024)
        pss += int(fields.get("Pss", 0)) * 1024
    return largest, pss


def prepare(source: str, tokenizer: str, cache: str, workers: int, cores: str | None
            ) -> dict:
    """One timed ``prepare`` into a fresh ``cache`` folder; its figures."""
    shutil.rmtree(cache, ignore_errors=True)
    command = [sys.executable, "-m", "titan_lite.data", "prepare", "--data.paths", source,
               "--tokenizer.path", tokenizer, "--data.cache_dir", cache,
               "--data.workers", str(workers)]
    if cores is not None:
        command = ["taskset", "-c", cores, *command]
    env = {**os.environ, "PYTHONPATH": REPO}
    started = time.monotonic()
    job = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    peak_rss = peak_pss = 0
    while job.poll() is None:
        rss, pss = _memory(job.pid)
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(0.2)
    seconds = time.monotonic() - started
    output = job.stdout.read()
    if job.returncode != 0:
        raise SystemExit(f"prepare failed:\n{output}")
    (folder,) = [os.path.join(cache, n) for n in os.listdir(cache) if n.endswith(".tokens")]
    tokens = json.load(open(os.path.join(folder, "manifest.json")))["counts"]["tokens"]
    return {"seconds": seconds, "tokens": tokens, "rss": peak_rss, "pss": peak_pss,
            "cache": folder}


def launch_to_first_step(source: str, cache: str) -> float:
    """Seconds from launching the trainer (one process) to its first step's line."""
    command = [sys.executable, "-m", "titan_lite.train", "--data.paths", source,
               "--data.cache_dir", cache, "--tokenizer.path", SHIPPED, "--training.steps", "1",
               "--training.seq_len", "256", "--training.local_batch_size", "2",
               "--metrics.enable_jsonl", "false", "--job.dump_folder",
               os.path.join(cache, "run")]
    started = time.monotonic()
    job = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in job.stdout:
        if "step     1/" in line:
            seconds = time.monotonic() - started
            job.wait()
            return seconds
    raise SystemExit("the trainer never reached step 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--folder", default="/tmp/titan_lite_bench_data")
    parser.add_argument("--docs", action="store_true", help="write the table into docs/data.md")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    inputs = write_inputs(args.folder, args.gb)
    rows = ["| input | tokenizer | how | MB/s | M tokens/s | peak RSS, largest process | "
            "peak PSS, all processes |", "|---|---|---|---|---|---|---|"]
    parquet_cache = None
    for name, tokenizer in tokenizers():
        for fmt, source in inputs.items():
            size = os.path.getsize(source) if fmt != "parquet" else os.path.getsize(
                inputs["txt"])  # (Parquet compresses: the text's size is what is read)
            runs = [("1 core, 1 process", 1, "0"), (f"{cores} cores, {cores} worker processes",
                                                   cores, None)]
            if fmt == "jsonl":
                runs.append((f"{cores} cores, 1 process (tokenizer threads)", 1, None))
            for how, workers, pin in runs:
                cache = os.path.join(args.folder, "cache")
                r = prepare(source, tokenizer, cache, workers, pin)
                rows.append(f"| {size / 1e9:.1f} GB .{fmt} | {name} | {how} | "
                            f"{size / 1e6 / r['seconds']:.1f} | "
                            f"{r['tokens'] / 1e6 / r['seconds']:.2f} | "
                            f"{r['rss'] / 2**30:.2f} GiB | {r['pss'] / 2**30:.2f} GiB |")
                print(rows[-1], flush=True)
                if fmt == "parquet" and tokenizer == SHIPPED and workers > 1:
                    parquet_cache = os.path.join(args.folder, "prepared")
                    shutil.rmtree(parquet_cache, ignore_errors=True)
                    shutil.move(cache, parquet_cache)
    table = "\n".join(rows)
    if parquet_cache is not None:
        seconds = launch_to_first_step(inputs["parquet"], parquet_cache)
        table += (f"\n\nLaunch to step 1 of the debug model on the prepared {args.gb:g} GB "
                  f"Parquet corpus: {seconds:.1f} s.")
    print("\n" + table)
    if args.docs:
        page = os.path.join(REPO, "docs", "data.md")
        text = open(page).read()
        start, end = (text.index(marker) for marker in MARKERS)
        text = text[:start + len(MARKERS[0])] + "\n" + table + "\n" + text[end:]
        open(page, "w").write(text)
        print("docs/data.md table updated")


if __name__ == "__main__":
    main()
