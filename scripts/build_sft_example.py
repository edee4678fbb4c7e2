"""Rebuild the shipped instruction-tuning example from the sample corpus.

    python scripts/build_sft_example.py [ASSETS_FOLDER]

Writes titan_lite/assets/data/kjv_sft.jsonl: Alpaca records ({"instruction", "input",
"output"}) about verses of the KJV sample, whose answers are checkable and learnable by the
debug model in minutes: does the verse speak of the LORD, does it speak of God (half of each
yes, half no), and what is its first word. Beside it, kjv_sft_held_out.jsonl: the records
train_configs/debug_sft.toml holds out (validation.split 0.05, seed 0), for `predict`; and
eval_tasks/kjv_yes_no.jsonl: their yes/no questions, the data of the lm-evaluation-harness
task eval_tasks/kjv_yes_no.yaml.
Deterministic: the same corpus gives byte-identical files (a test checks it).
"""

from __future__ import annotations

import json
import os
import random
import sys

ASSETS = os.path.join(os.path.dirname(__file__), "..", "titan_lite", "assets")
CORPUS = os.path.join(ASSETS, "data", "kjv_sample.jsonl")
OUTPUTS = ("data/kjv_sft.jsonl", "data/kjv_sft_held_out.jsonl", "eval_tasks/kjv_yes_no.jsonl")
HELD_OUT, SEED = 0.05, 0  # debug_sft.toml's validation.split and job.seed
NUM_RECORDS = 3000
WORDS = (6, 30)  # verses of this many words: short enough to pack several into a row
PUNCTUATION = ".,;:!?'()"



def mentions(word: str):
    return lambda verse: "Yes." if word in verse.split() or f"{word}," in verse else "No."


def first_word(verse: str) -> str:
    return verse.split()[0].strip(PUNCTUATION)


# (question, answer(verse), word whose presence is balanced half yes / half no, or None)
TASKS = [
    ("Does this verse speak of the LORD?", mentions("LORD"), "LORD"),
    ("Does this verse speak of God?", mentions("God"), "God"),
    ("What is the first word of this verse?", first_word, None),
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
    pool = [v for v in verses(corpus) if WORDS[0] <= len(v.split()) <= WORDS[1]]
    rng = random.Random(0)
    per_task = NUM_RECORDS // len(TASKS)
    by_task = []
    for question, answer, balanced in TASKS:
        if balanced is None:
            chosen = rng.sample(pool, per_task)
        else:
            yes = [v for v in pool if answer(v) == "Yes."]
            no = [v for v in pool if answer(v) == "No."]
            chosen = rng.sample(yes, per_task // 2) + rng.sample(no, per_task - per_task // 2)
            rng.shuffle(chosen)
        by_task.append([{"instruction": question, "input": v, "output": answer(v)}
                        for v in chosen])
    return [record for group in zip(*by_task) for record in group]  # tasks interleaved


def main(folder: str = ASSETS) -> None:
    from titan_lite.data.loader import split_indices

    every = records(CORPUS)
    _, held = split_indices(len(every), HELD_OUT, SEED)
    held_out = [every[i] for i in held]
    yes_no = [{"question": r["instruction"], "verse": r["input"], "answer": r["output"]}
              for r in held_out if r["output"] in ("Yes.", "No.")]
    for name, lines in zip(OUTPUTS, (every, held_out, yes_no)):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)
        print(f"wrote {len(lines)} records to {os.path.normpath(path)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
