"""Tokenizers behind one small interface: a tiktoken BPE (Llama 3), a sentencepiece model
(Llama 2), or a Hugging Face ``tokenizer.json`` read into one of those two engines; given by
file or found in a model folder, with bos/eos/pad from the folder's ``tokenizer_config.json``."""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from typing import Protocol

# The regex Llama 3 uses to split text before byte-pair merging.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-2's split, which a Hugging Face ByteLevel pre-tokenizer with use_regex applies.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken's Rust core recurses per regex match; Meta splits inputs to stay far from its limits.
_MAX_ENCODE_CHARS = 400_000
KINDS = ("auto", "tiktoken", "sentencepiece", "huggingface")
# Where a model folder keeps its tokenizer, in the order they are preferred: the engines' own
# files first (exact by construction; Meta's Llama 3 tiktoken file sits in original/), then
# tokenizer.json.
_FOLDER_FILES = ("original/tokenizer.model", "tokenizer.model", "tokenizer.json")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>")


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
    pad_id: int | None
    special_ids: dict[str, int]  # control tokens by name (chat headers, bos, eos, ...)
    files: list[str]  # what it was read from (token caches are keyed on their contents)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_id(self, name: str) -> int | None: ...


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
    """A byte-level BPE run by tiktoken: Llama 3's tokenizer.model (``from_file``) or a
    Hugging Face byte-level tokenizer.json (``read_hf_tokenizer``)."""

    def __init__(self, name: str, ranks: dict[bytes, int], specials: dict[str, int],
                 pattern: str, bos: str | None, eos: str | None, files: list[str]):
        import tiktoken

        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.vocab_size = self.encoding.n_vocab
        self.special_ids = specials
        # None until a tokenizer_config.json names them (checked in build_tokenizer)
        self.bos_id, self.eos_id = specials.get(bos), specials.get(eos)
        self.pad_id = None
        self.files = files

    @classmethod
    def from_file(cls, path: str) -> TikTokenizer:
        """Llama 3's tokenizer: a tiktoken BPE file plus the Llama 3 special tokens."""
        ranks = read_bpe_ranks(path)
        specials = {tok: len(ranks) + i for i, tok in enumerate(llama3_special_tokens())}
        return cls(path, ranks, specials, LLAMA3_PATTERN, "<|begin_of_text|>",
                   "<|end_of_text|>", [path])

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # Special-token text inside a document is encoded as plain text, never as control ids.
        ids = [self.bos_id] if bos else []
        for start in range(0, len(text), _MAX_ENCODE_CHARS):
            ids.extend(self.encoding.encode_ordinary(text[start:start + _MAX_ENCODE_CHARS]))
        return ids + [self.eos_id] if eos else ids

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def token_id(self, name: str) -> int | None:
        if name in self.special_ids:
            return self.special_ids[name]
        try:
            return self.encoding.encode_single_token(name.encode())
        except KeyError:
            return None


class SentencePieceTokenizer:
    """Llama 2 style tokenizer: a sentencepiece ``.model`` file, or the serialized model a
    sentencepiece-style tokenizer.json is rebuilt into (``read_hf_tokenizer``)."""

    def __init__(self, path: str, model_proto: bytes | None = None,
                 files: list[str] | None = None):
        import sentencepiece

        self.model = (sentencepiece.SentencePieceProcessor(model_file=path) if model_proto is None
                      else sentencepiece.SentencePieceProcessor(model_proto=model_proto))
        self.vocab_size = self.model.vocab_size()
        # sentencepiece says -1 for a missing piece; None until tokenizer_config.json names one
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self.model.bos_id(), self.model.eos_id(),
                                            self.model.pad_id()))
        self.special_ids = {self.model.id_to_piece(i): i for i in range(self.vocab_size)
                            if self.model.is_control(i)}
        self.files = files or [path]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.model.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)

    def token_id(self, name: str) -> int | None:
        found = self.model.piece_to_id(name)
        return found if found != self.model.unk_id() or name == self.model.id_to_piece(
            found) else None


def find_tokenizer(kind: str, path: str) -> tuple[str, str]:
    """(kind, file) of the tokenizer at ``path``: a file, or a model folder searched for
    original/tokenizer.model, tokenizer.model and tokenizer.json (in that order) of ``kind``
    ('auto': any); 'auto' on a file tells the kinds apart by their contents."""
    if os.path.isdir(path):
        for name in _FOLDER_FILES:
            file = os.path.join(path, name)
            found = _sniff(file) if os.path.isfile(file) else None
            if found is not None and kind in ("auto", found):
                return found, file
        wanted = "" if kind == "auto" else f" of kind {kind!r}"
        raise ValueError(f"tokenizer.path: {path} has no tokenizer{wanted} (looked for "
                         f"{', '.join(_FOLDER_FILES)})")
    return (_sniff(path) if kind == "auto" else kind), path


def _sniff(file: str) -> str:
    """tiktoken files are text lines of base64 and a rank; sentencepiece's are protobuf."""
    if file.endswith(".json"):
        return "huggingface"
    with open(file, "rb") as fh:
        first = fh.readline(200)
    return "tiktoken" if re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+\r?\n?", first) else "sentencepiece"


def build_tokenizer(kind: str, path: str) -> Tokenizer:
    """Load the tokenizer of ``kind`` ('auto', 'tiktoken', 'sentencepiece' or 'huggingface')
    at ``path`` (a file, or a model folder; see ``find_tokenizer``). A folder's
    tokenizer_config.json names its bos, eos and pad tokens (as Hugging Face uses them)."""
    if kind not in KINDS:
        raise ValueError(f"tokenizer.kind: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    kind, file = find_tokenizer(kind, path)
    if kind == "tiktoken":
        tokenizer = TikTokenizer.from_file(file)
    elif kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer(file)
    else:
        tokenizer = read_hf_tokenizer(file)
    folder = path if os.path.isdir(path) else os.path.dirname(file)
    apply_tokenizer_config(tokenizer, os.path.join(folder, "tokenizer_config.json"))
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise ValueError(f"{file}: no bos/eos token (looked for {', '.join(_BOS_NAMES)} / "
                         f"{', '.join(_EOS_NAMES)}); name them (bos_token, eos_token) in a "
                         "tokenizer_config.json beside it")
    return tokenizer


def apply_tokenizer_config(tokenizer: Tokenizer, config_path: str) -> None:
    """Take bos/eos/pad from a Hugging Face tokenizer_config.json beside the tokenizer (an
    instruct model's eos is its end-of-turn token), when there is one."""
    if not os.path.isfile(config_path):
        return
    with open(config_path) as fh:
        config = json.load(fh)
    for key in ("bos_token", "eos_token", "pad_token"):
        name = config.get(key)
        name = name.get("content") if isinstance(name, dict) else name
        if not name:
            continue
        token = tokenizer.token_id(name)
        if token is None:
            raise ValueError(f"{config_path}: {key} {name!r} is not a token of "
                             f"{tokenizer.files[0]}")
        setattr(tokenizer, key.replace("_token", "_id"), token)
    tokenizer.files = [*tokenizer.files, config_path]


# --- Hugging Face tokenizer.json ------------------------------------------------------------

def read_hf_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face BPE tokenizer.json, run by the engine it came from: byte-level BPE
    (Llama 3, GPT-2 style) by tiktoken from its vocab and merges; a sentencepiece-style BPE
    (Llama 2, TinyLlama: ``▁`` for spaces, byte fallback) by sentencepiece from a model
    rebuilt of its pieces. Anything else is refused with the field that differs."""
    with open(path, encoding="utf-8") as fh:
        spec = json.load(fh)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model.type {model.get('type')!r}: only BPE tokenizers are "
                         "supported")
    added = {t["content"]: t["id"] for t in spec.get("added_tokens") or []}
    plain = [t["content"] for t in spec.get("added_tokens") or [] if not t.get("special")
             and t["content"] not in model["vocab"]]
    if plain:
        raise ValueError(f"{path}: added_tokens: {plain[0]!r} is not special (Hugging Face "
                         "splits text on such tokens, which this reader does not)")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m)
              for m in model.get("merges") or []]
    if _is_sentencepiece_style(spec):
        _check_sentencepiece_style(path, spec)
        return SentencePieceTokenizer(path, _sentencepiece_proto(path, model, added, merges),
                                      [path])
    pattern = _byte_level_pattern(path, spec)
    to_byte = {c: b for b, c in _bytes_to_unicode().items()}
    try:
        ranks = {bytes(to_byte[c] for c in token): i for token, i in model["vocab"].items()
                 if token not in added}
    except KeyError:
        raise ValueError(f"{path}: model.vocab has tokens outside the byte-level alphabet; "
                         "not a byte-level BPE") from None
    _check_merge_order(path, model["vocab"], merges)
    return TikTokenizer(path, ranks, added, pattern, _first_present(added, _BOS_NAMES),
                        _first_present(added, _EOS_NAMES), [path])


def _first_present(added: dict[str, int], names: tuple[str, ...]) -> str | None:
    """The first of the usual names of a control token that the tokenizer has."""
    return next((name for name in names if name in added), None)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes onto printable characters (byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + i) for i, b in enumerate(others)}}


def _byte_level_pattern(path: str, spec: dict) -> str:
    """The split regex of a byte-level tokenizer.json that tiktoken can apply unchanged."""
    if spec.get("normalizer"):
        raise ValueError(f"{path}: normalizer {spec['normalizer'].get('type')!r}: a byte-level "
                         "tokenizer with a normalizer is not supported")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get(
            "add_prefix_space"):
        return GPT2_PATTERN
    if (kinds == ["Split", "ByteLevel"] and "Regex" in steps[0].get("pattern", {})
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
        return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{path}: pre_tokenizer {kinds}: supported are ByteLevel (GPT-2 regex) "
                     "and Split(regex, Isolated) + ByteLevel, without add_prefix_space")


def _check_merge_order(path: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """tiktoken merges the pair whose joined token has the lowest id, Hugging Face the pair
    listed first: the two agree when the merges come in the order of their tokens' ids."""
    last = -1
    for line, (left, right) in enumerate(merges):
        token = vocab.get(left + right)
        if token is None or token < last:
            raise ValueError(f"{path}: model.merges[{line}] {left!r} + {right!r}: "
                             + ("its token is not in the vocab" if token is None else
                                "merges are not in the order of their tokens' ids, which "
                                "tiktoken needs"))
        last = token


def _is_sentencepiece_style(spec: dict) -> bool:
    pre, norm = spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}
    return (spec["model"].get("byte_fallback", False) or pre.get("type") == "Metaspace"
            or "▁" in json.dumps(norm, ensure_ascii=False))


def _check_sentencepiece_style(path: str, spec: dict) -> None:
    """Accept the two ways Hugging Face writes sentencepiece's add-dummy-prefix + ``▁``:
    a Prepend/Replace normalizer (older Llama 2 files) or a Metaspace pre-tokenizer."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    old_style = (norm is not None and norm.get("type") == "Sequence" and pre is None and [
        (n.get("type"), n.get("prepend"), n.get("pattern", {}).get("String"), n.get("content"))
        for n in norm["normalizers"]] == [("Prepend", "▁", None, None),
                                          ("Replace", None, " ", "▁")])
    new_style = (norm is None and pre is not None and pre.get("type") == "Metaspace"
                 and pre.get("replacement") == "▁" and not pre.get("split")
                 and pre.get("prepend_scheme") in ("first", "always"))
    if not (old_style or new_style):
        raise ValueError(f"{path}: normalizer/pre_tokenizer: a sentencepiece-style tokenizer "
                         "must prepend '▁' and replace spaces by it (Prepend + Replace, or "
                         "Metaspace without split); this one does something else")


def _sentencepiece_proto(path: str, model: dict, added: dict[str, int],
                         merges: list[tuple[str, str]]) -> bytes:
    """A serialized sentencepiece BPE ModelProto with the pieces of a sentencepiece-style
    tokenizer.json. sentencepiece merges the adjacent pair whose joined piece scores highest,
    so each piece scores minus the index of the first merge that makes it."""
    vocab = {**model["vocab"], **added}
    by_id = {i: token for token, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ValueError(f"{path}: model.vocab and added_tokens leave gaps in the ids; "
                         "sentencepiece needs ids 0..n-1")
    first_merge: dict[str, int] = {}
    for i, (left, right) in enumerate(merges):
        first_merge.setdefault(left + right, i)
    unk = model.get("unk_token")
    pieces = b""
    for i in range(len(by_id)):
        token = by_id[i]
        if token == unk:
            kind, score = 2, 0.0  # UNKNOWN
        elif token in added:
            kind, score = 3, 0.0  # CONTROL: never made from text, as our encode wants
        elif model.get("byte_fallback") and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            kind, score = 6, 0.0  # BYTE
        else:
            kind, score = 1, -float(first_merge.get(token, len(merges) + i))  # NORMAL
        pieces += _proto_field(1, _proto_field(1, token.encode()) + _proto_float(2, score)
                               + _proto_varint(3, kind))
    if unk is None or unk not in vocab:
        raise ValueError(f"{path}: model.unk_token: sentencepiece needs an unknown token")
    names = {name: _first_present(added, names) or "" for name, names in
             (("bos", _BOS_NAMES), ("eos", _EOS_NAMES))}
    trainer = (_proto_varint(3, 2) + _proto_varint(4, len(by_id))  # BPE, vocab size
               + _proto_varint(35, int(bool(model.get("byte_fallback"))))
               + _proto_field(45, unk.encode()) + _proto_field(46, names["bos"].encode())
               + _proto_field(47, names["eos"].encode()))
    normalizer = (_proto_field(1, b"identity") + _proto_varint(3, 1)  # add_dummy_prefix
                  + _proto_varint(4, 0) + _proto_varint(5, 1))  # keep spaces, escape them
    return pieces + _proto_field(2, trainer) + _proto_field(3, normalizer)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
        n >>= 7
        if not n:
            return out


def _proto_field(number: int, payload: bytes) -> bytes:  # length-delimited (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _proto_varint(number: int, value: int) -> bytes:  # wire type 0
    return _varint(number << 3) + _varint(value)


def _proto_float(number: int, value: float) -> bytes:  # fixed32 (wire type 5)
    return _varint(number << 3 | 5) + struct.pack("<f", value)
