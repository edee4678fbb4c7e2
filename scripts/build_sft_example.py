"""Rebuild the shipped instruction-tuning example from the sample corpus.

    python scripts/build_sft_example.py [OUT_FILE]

Writes titan_lite/assets/data/kjv_sft.jsonl: Alpaca records ({"instruction", "input",
"output"}) about verses of the KJV sample, whose answers are checkable and learnable by the
debug model in minutes: repeat the verse, or name its first or its last word.
Deterministic: the same corpus gives a byte-identical file (a test checks it).
"""

from __future__ import annotations

import json
import os
import random
import sys

ASSETS = os.path.join(os.path.dirname(__file__), "..", "titan_lite", "assets", "data")
CORPUS = os.path.join(ASSETS, "kjv_sample.jsonl")
OUT = os.path.join(ASSETS, "kjv_sft.jsonl")
NUM_RECORDS = 3000
WORDS = (8, 24)  # verses of this many words: short enough to pack several into a row
PUNCTUATION = ".,;:!?'()"

# Repeating whole verses gives many target tokens and teaches the model to copy from the
# prompt, which the one-word answers then build on.
TASKS = [
    ("Repeat this verse.", lambda words: " ".join(words)),
    ("What is the first word of this verse?", lambda words: words[0].strip(PUNCTUATION)),
    ("What is the last word of this verse?", lambda words: words[-1].strip(PUNCTUATION)),
]


def verses(corpus: str) -> list[str]:
    """Every verse of the corpus: the lines of each chapter after its 'Book N' heading."""
    found = []
    with open(corpus, encoding="utf-8") as fh:
        for line in fh:
            chapter = json.loads(line)["text"].split("\n")
            found += [verse for verse in chapter[2:] if verse.strip()]
    return found


def records(corpus: str) -> list[dict[str, str]]:
    chosen = [v for v in verses(corpus) if WORDS[0] <= len(v.split()) <= WORDS[1]]
    chosen = random.Random(0).sample(chosen, NUM_RECORDS)
    out = []
    for index, verse in enumerate(chosen):
        question, answer = TASKS[index % len(TASKS)]
        out.append({"instruction": question, "input": verse, "output": answer(verse.split())})
    return out


def main(out: str = OUT) -> None:
    with open(out, "w", encoding="utf-8") as fh:
        for record in records(CORPUS):
            fh.write(json.dumps(record) + "\n")
    print(f"wrote {NUM_RECORDS} records to {os.path.normpath(out)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
