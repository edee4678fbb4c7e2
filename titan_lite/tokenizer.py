"""Tokenizers behind one small interface: Llama 3 tiktoken BPE and Llama 2 sentencepiece."""

from __future__ import annotations

import base64
from typing import Protocol

# The regex Llama 3 uses to split text before byte-pair merging.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken's Rust core recurses per regex match; Meta splits inputs to stay far from its limits.
_MAX_ENCODE_CHARS = 400_000


def llama3_special_tokens() -> list[str]:
    """Llama 3's 256 special tokens, in id order after the BPE ranks."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
             "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|reserved_special_token_4|>", "<|eot_id|>"]
    reserved = [f"<|reserved_special_token_{i}|>"
                for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - len(named) + 5)]
    return named + reserved


class Tokenizer(Protocol):
    """What the data pipeline and the model need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def read_bpe_ranks(path: str) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one ``base64(token) rank`` pair per line."""
    ranks = {}
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not a 'base64 rank' line: "
                                 f"{line[:60]!r}") from e
    return ranks


class TikTokenizer:
    """Llama 3 tokenizer: a tiktoken BPE file plus the Llama 3 special tokens."""

    def __init__(self, path: str):
        import tiktoken

        ranks = read_bpe_ranks(path)
        specials = {tok: len(ranks) + i for i, tok in enumerate(llama3_special_tokens())}
        self.encoding = tiktoken.Encoding(name=path, pat_str=LLAMA3_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=specials)
        self.vocab_size = self.encoding.n_vocab
        self.bos_id = specials["<|begin_of_text|>"]
        self.eos_id = specials["<|end_of_text|>"]
        self.special_ids = specials

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # Special-token text inside a document is encoded as plain text, never as control ids.
        ids = [self.bos_id] if bos else []
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            ids.extend(self.encoding.encode_ordinary(text[start:start + _MAX_ENCODE_CHARS]))
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)


class SentencePieceTokenizer:
    """Llama 2 style tokenizer from a sentencepiece ``.model`` file."""

    def __init__(self, path: str):
        import sentencepiece

        self.model = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.model.vocab_size()
        self.bos_id = self.model.bos_id()
        self.eos_id = self.model.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path}: sentencepiece model has no bos/eos pieces")

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.model.encode(text, add_bos=bos, add_eos=eos)

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)


def build_tokenizer(kind: str, path: str) -> Tokenizer:
    """Load a tokenizer of ``kind`` ('tiktoken' or 'sentencepiece') from ``path``."""
    if kind == "tiktoken":
        return TikTokenizer(path)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}")
