"""Rebuild the test tokenizers shipped in titan_lite/assets/tokenizers/ from the sample corpus.

    python scripts/build_test_tokenizers.py [OUT_DIR]

Deterministic: the same corpus gives byte-identical files. Writes
- test_tiktoken.model: 2,000 byte-level BPE ranks in tiktoken's format (base64 token, rank),
  trained with Llama 3's pre-tokenizer regex; with the 256 Llama 3 specials: vocab 2,256.
- test_spm.model: a 2,000-piece sentencepiece BPE model with byte fallback, identity
  normalization and no whitespace folding (as Llama 2's), so text round-trips exactly.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from collections import Counter, defaultdict

import regex

from titan_lite.data.tokenizer import LLAMA3_PATTERN

ASSETS = os.path.join(os.path.dirname(__file__), "..", "titan_lite", "assets")
CORPUS = os.path.join(ASSETS, "data", "kjv_sample.jsonl")
OUT = os.path.join(ASSETS, "tokenizers")
NUM_RANKS = 2000


def corpus_texts() -> list[str]:
    with open(CORPUS, encoding="utf-8") as fh:
        return [json.loads(line)["text"] for line in fh]


def train_byte_bpe(texts: list[str], num_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE: start from the 256 bytes, merge the most frequent adjacent pair."""
    counts = Counter(piece for text in texts for piece in regex.findall(LLAMA3_PATTERN, text))
    words = [[bytes([b]) for b in piece.encode()] for piece in counts]
    freq = list(counts.values())
    pair_count: Counter = Counter()
    pair_words: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            pair_count[pair] += freq[i]
            pair_words[pair].add(i)
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < num_ranks and pair_count:
        # Ties are broken by the bytes themselves so that the result is reproducible.
        best = max(pair_count.items(), key=lambda item: (item[1], item[0]))[0]
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        for i in list(pair_words[best]):
            word = words[i]
            for pair in zip(word, word[1:]):
                pair_count[pair] -= freq[i]
            new, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == best:
                    new.append(merged)
                    j += 2
                else:
                    new.append(word[j])
                    j += 1
            words[i] = new
            for pair in zip(new, new[1:]):
                pair_count[pair] += freq[i]
                pair_words[pair].add(i)
        pair_count = Counter({p: c for p, c in pair_count.items() if c > 0})
    return ranks


def write_tiktoken(ranks: dict[bytes, int], path: str) -> None:
    with open(path, "w") as fh:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            fh.write(f"{base64.b64encode(token).decode()} {rank}\n")


def write_sentencepiece(texts: list[str], path: str) -> None:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(line for text in texts for line in text.splitlines() if line),
        model_writer=model, vocab_size=NUM_RANKS, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    with open(path, "wb") as fh:
        fh.write(model.getvalue())


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else OUT
    texts = corpus_texts()
    write_tiktoken(train_byte_bpe(texts, NUM_RANKS), os.path.join(out, "test_tiktoken.model"))
    write_sentencepiece(texts, os.path.join(out, "test_spm.model"))
    print(f"wrote {out}/test_tiktoken.model and {out}/test_spm.model")


if __name__ == "__main__":
    main()
