"""Tokenizing a corpus: one document at a time vs the engines' batch encoding.

    python bench/bench_tokenize.py [--mb 20]

The shipped KJV sample's documents, repeated to about ``--mb`` MB, go through each engine's
``encode`` one document at a time and through ``encode_batch`` (what ``tokenize_to_cache``
uses: tiktoken's and sentencepiece's thread pools, the ``tokenizers`` library's Rust threads),
side by side in one run; the ids must be equal. Engines: tiktoken with Meta's 128k Llama 3
``tokenizer.model`` (from the ``llama-models`` package, when installed), the shipped test
tiktoken and sentencepiece models, and a 32k byte-level BPE ``tokenizer.json`` (Digits +
ByteLevel, as Qwen's) trained here with the ``tokenizers`` library. Prints MB/s and tokens/s.
Not a test: the figures go to docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from titan_lite.data.tokenizer import build_tokenizer  # noqa: E402
from titan_lite.data.tokenizer import _threads  # noqa: E402

CORPUS = os.path.join(REPO, "titan_lite/assets/data/kjv_sample.jsonl")


def documents(megabytes: float) -> list[str]:
    texts = [json.loads(line)["text"] for line in open(CORPUS)]
    size = sum(len(t.encode()) for t in texts)
    return texts * max(1, round(megabytes * 1e6 / size))


def byte_level_json(folder: str, texts: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=32000, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = os.path.join(folder, "tokenizer.json")
    hf.save(path)
    return path


def engines(folder: str, texts: list[str]) -> list[tuple[str, str]]:
    found = []
    try:
        import llama_models

        meta = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
        if os.path.isfile(meta):
            found.append(("tiktoken, Meta's Llama 3 (128k)", meta))
    except ImportError:
        pass
    found += [("tiktoken, shipped test model", "titan_lite/assets/tokenizers/"
               "test_tiktoken.model"),
              ("sentencepiece, shipped test model", "titan_lite/assets/tokenizers/"
               "test_spm.model"),
              ("tokenizer.json, byte-level BPE 32k", byte_level_json(folder, texts[:2000]))]
    return found


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=20.0)
    args = parser.parse_args()
    os.chdir(REPO)
    texts = documents(args.mb)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    print(f"{len(texts):,} documents, {megabytes:.1f} MB, {_threads()} thread(s)")
    print("| engine | one at a time | encode_batch | speed-up |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, path in engines(folder, texts):
            tok = build_tokenizer("auto", path)
            single_s, single = timed(lambda: [tok.encode(t, bos=True, eos=True) for t in texts])
            batch_s, batch = timed(lambda: tok.encode_batch(texts, bos=True, eos=True))
            assert batch == single, name
            tokens = sum(map(len, batch))
            print(f"| {name} | {megabytes / single_s:.1f} MB/s | {megabytes / batch_s:.1f} MB/s"
                  f" ({tokens / batch_s / 1e6:.2f} M tokens/s) | {single_s / batch_s:.2f}x |")


if __name__ == "__main__":
    main()
