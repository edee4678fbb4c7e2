"""Tokenizers behind one small interface: a tiktoken BPE (Meta's Llama 3 ``tokenizer.model``),
a sentencepiece model (Llama 2's ``tokenizer.model``), or a Hugging Face ``tokenizer.json`` run
by the ``tokenizers`` library; given by file or found in a model folder, with bos/eos/pad from
the folder's ``tokenizer_config.json``."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
from collections.abc import Sequence
from typing import Protocol

from titan_lite.config.schema import TOKENIZER_KINDS

# The regex Llama 3 uses to split text before byte-pair merging.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 256
# tiktoken's Rust core recurses per regex match; Meta splits inputs to stay far from its limits.
_MAX_ENCODE_CHARS = 400_000
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

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False
                     ) -> list[list[int]]:
        """``encode`` of each text, on the engine's own threads (whole data sets)."""
        ...

    def encode_with_specials(self, text: str, plain: Sequence[tuple[int, int]] = ()
                             ) -> list[int]:
        """``text`` (a rendered chat template) with its special tokens' texts as control ids,
        except inside the ``plain`` (start, end) character spans (message contents), which
        stay text; no bos/eos added."""
        ...

    def encode_continuation(self, text: str) -> list[int]:
        """The ids of ``text`` as the rest of a text cut by ``safe_cut`` (no bos, and none of
        the prefix a tokenizer gives a text's start, such as sentencepiece's "▁")."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def token_id(self, name: str) -> int | None: ...


# Where a text may be cut into pieces encoded one by one: between words (before a single
# space) or at the start of a line; each candidate is checked by encoding its neighbourhood.
_CUT_CANDIDATE = re.compile(r"(?<=\S) (?=\S)|(?<=\n)(?=\S)")
_CUT_CONTEXT = 256  # characters each side of a cut encoded to check it
_CUT_TRIES = 64


def safe_cut(tokenizer: Tokenizer, text: str, at: int, end: int | None = None) -> int | None:
    """The first position in [at, end) where ``text`` can be cut so that encoding the two
    pieces (the second with ``encode_continuation``) gives the ids of the whole, or None.

    A candidate is checked on its neighbourhood (encoded whole and in two). For pre-tokenizing
    BPEs (tiktoken, byte-level tokenizer.json) a candidate is a pre-token boundary, which no
    merge crosses, so the check confirms what holds for the whole text; for sentencepiece it is
    a word boundary, encoded without the dummy prefix. A position with too little text on
    either side to check is never taken."""
    end = len(text) if end is None else min(end, len(text))
    candidates = _CUT_CANDIDATE.finditer(text, max(at, _CUT_CONTEXT), end - _CUT_CONTEXT + 1)
    for tried, match in enumerate(candidates):
        if tried == _CUT_TRIES:
            return None
        cut = match.start()
        if cut + _CUT_CONTEXT > len(text):
            return None
        left, right = text[cut - _CUT_CONTEXT:cut], text[cut:cut + _CUT_CONTEXT]
        if (tokenizer.encode(left + right, bos=False)
                == tokenizer.encode(left, bos=False) + tokenizer.encode_continuation(right)):
            return cut
    return None


@functools.lru_cache(maxsize=16)
def _pattern(texts: frozenset[str]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(texts, key=len, reverse=True))))


def special_pattern(specials: dict[str, int]) -> re.Pattern | None:
    """A regex finding the special tokens' texts (longest first); None when there are none."""
    return _pattern(frozenset(specials)) if specials else None


def split_at_specials(text: str, specials: dict[str, int], plain: Sequence[tuple[int, int]]
                      ) -> list[str | int]:
    """``text`` as text pieces and the control ids of the special-token texts between them
    (longest match first), leaving those inside a ``plain`` span as text."""
    pattern = special_pattern(specials)
    if pattern is None:
        return [text]
    pieces: list[str | int] = []
    at = 0
    for match in pattern.finditer(text):
        if any(start < match.end() and match.start() < end for start, end in plain):
            continue
        pieces += [text[at:match.start()], specials[match.group()]]
        at = match.end()
    pieces.append(text[at:])
    return [piece for piece in pieces if piece != ""]


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
    """A byte-level BPE run by tiktoken: Llama 3's tokenizer.model (``from_file``)."""

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
        # A long text is encoded in pieces of at most _MAX_ENCODE_CHARS cut where the ids
        # cannot change (Meta cuts at the limit itself when it finds no such place).
        ids = [self.bos_id] if bos else []
        start = 0
        while len(text) - start > _MAX_ENCODE_CHARS:
            limit = start + _MAX_ENCODE_CHARS
            cut = safe_cut(self, text, limit - _MAX_ENCODE_CHARS // 2, limit) or limit
            ids.extend(self.encoding.encode_ordinary(text[start:cut]))
            start = cut
        ids.extend(self.encoding.encode_ordinary(text[start:]))
        return ids + [self.eos_id] if eos else ids

    def encode_continuation(self, text: str) -> list[int]:
        return self.encode(text, bos=False)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False
                     ) -> list[list[int]]:
        if any(len(text) > _MAX_ENCODE_CHARS for text in texts):  # (rare: split as encode)
            return [self.encode(text, bos, eos) for text in texts]
        batch = self.encoding.encode_ordinary_batch(texts, num_threads=_threads())
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in batch]

    def encode_with_specials(self, text: str, plain: Sequence[tuple[int, int]] = ()
                             ) -> list[int]:
        # (tiktoken itself cuts at special tokens and encodes the pieces between separately)
        return [id for piece in split_at_specials(text, self.special_ids, plain)
                for id in ([piece] if isinstance(piece, int) else self.encode(piece, bos=False))]

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
    """Llama 2 style tokenizer: a sentencepiece ``.model`` file."""

    def __init__(self, path: str):
        import sentencepiece

        self.model = sentencepiece.SentencePieceProcessor(model_file=path)
        self.vocab_size = self.model.vocab_size()
        # sentencepiece says -1 for a missing piece; None until tokenizer_config.json names one
        self.bos_id, self.eos_id, self.pad_id = (
            i if i >= 0 else None for i in (self.model.bos_id(), self.model.eos_id(),
                                            self.model.pad_id()))
        self.special_ids = {self.model.id_to_piece(i): i for i in range(self.vocab_size)
                            if self.model.is_control(i)}
        self.files = [path]
        # How text between control tokens is encoded, as transformers' Llama tokenizer does:
        # legacy (Llama 2, and its default) gives every piece sentencepiece's dummy prefix "▁";
        # otherwise (tokenizer_config.json "legacy": false: Mistral v0.3) only the text's start.
        self.legacy = True
        self._unk_text = self.model.id_to_piece(self.model.unk_id())
        self._unk_length = len(self.model.encode(self._unk_text))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.model.encode(text)
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False
                     ) -> list[list[int]]:
        batch = self.model.encode(texts, num_threads=_threads())
        return [[self.bos_id] * bos + ids + [self.eos_id] * eos for ids in batch]

    def encode_with_specials(self, text: str, plain: Sequence[tuple[int, int]] = ()
                             ) -> list[int]:
        ids: list[int] = []
        for index, piece in enumerate(split_at_specials(text, self.special_ids, plain)):
            if isinstance(piece, int):
                ids.append(piece)
            elif index == 0 or self.legacy:
                ids += self.model.encode(piece)
            else:
                ids += self.encode_continuation(piece)
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        # no dummy prefix: encoded after a known piece, which is then dropped
        return self.model.encode(self._unk_text + text)[self._unk_length:]

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
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer.kind: unknown kind {kind!r} (one of "
                         f"{', '.join(TOKENIZER_KINDS)})")
    kind, file = find_tokenizer(kind, path)
    if kind == "tiktoken":
        tokenizer = TikTokenizer.from_file(file)
    elif kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer(file)
    else:
        tokenizer = HuggingFaceTokenizer(file)
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
    if isinstance(config.get("legacy"), bool) and hasattr(tokenizer, "legacy"):
        tokenizer.legacy = config["legacy"]
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

class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` run by the ``tokenizers`` library, the format's own
    reader: every normalizer, pre-tokenizer, model (BPE, WordPiece, Unigram), byte fallback,
    decoder and added token applies exactly as Hugging Face applies it, so the ids are the
    library's by construction. Special tokens written in a document or a user message stay
    text, never control ids (as the other engines here encode them)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self.tokenizer = RustTokenizer.from_file(path)
        except Exception as e:  # the library's own parse errors: one line naming the file
            raise ValueError(f"{path}: not a tokenizer.json the tokenizers library can read "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                             ) from None
        self.tokenizer.encode_special_tokens = True  # special-token text stays plain text
        added = self.tokenizer.get_added_tokens_decoder()
        self.special_ids = {token.content: i for i, token in added.items() if token.special}
        # (ids may leave gaps: the embedding needs a row for the largest)
        self.vocab_size = max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        # None until a tokenizer_config.json names them (checked in build_tokenizer)
        self.bos_id = self.special_ids.get(_first_present(self.special_ids, _BOS_NAMES))
        self.eos_id = self.special_ids.get(_first_present(self.special_ids, _EOS_NAMES))
        self.pad_id = None
        self.files = [path]
        self._newline_ids = self.encode("\n", bos=False)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False
                     ) -> list[list[int]]:
        # (the library's own thread pool: RAYON_NUM_THREADS / TOKENIZERS_PARALLELISM)
        batch = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [[self.bos_id] * bos + e.ids + [self.eos_id] * eos for e in batch]

    def encode_continuation(self, text: str) -> list[int]:
        # after a newline that is then dropped: no prefix a pre-tokenizer gives a text's start
        ids = self.encode("\n" + text, bos=False)
        head = self._newline_ids
        return ids[len(head):] if ids[:len(head)] == head else self.encode(text, bos=False)

    def encode_with_specials(self, text: str, plain: Sequence[tuple[int, int]] = ()
                             ) -> list[int]:
        # The whole text through the library with special tokens recognised, exactly as
        # transformers' apply_chat_template tokenizes; a control token found inside a
        # message's content is put back as that text's plain ids.
        self.tokenizer.encode_special_tokens = False
        try:
            encoding = self.tokenizer.encode(text, add_special_tokens=False)
        finally:
            self.tokenizer.encode_special_tokens = True
        special = set(self.special_ids.values())
        ids: list[int] = []
        for id, (start, end) in zip(encoding.ids, encoding.offsets):
            inside = any(s <= start and end <= e for s, e in plain)
            ids += self.encode(text[start:end], bos=False) if id in special and inside else [id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_id(self, name: str) -> int | None:
        return self.tokenizer.token_to_id(name)


def _threads() -> int:
    """Threads for batch encoding: the cores this process may use (one in a data builder's
    worker processes, which set TITAN_LITE_ENCODE_THREADS)."""
    if os.environ.get("TITAN_LITE_ENCODE_THREADS"):
        return int(os.environ["TITAN_LITE_ENCODE_THREADS"])
    return usable_cores()


def usable_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def _first_present(names_to_ids: dict[str, int], names: tuple[str, ...]) -> str | None:
    """The first of the usual names of a control token that the tokenizer has."""
    return next((name for name in names if name in names_to_ids), None)
