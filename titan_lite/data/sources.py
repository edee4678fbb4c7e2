"""Where documents and records come from: the files a data path names, each cut into parts of
about ``data.shard_mb`` that are read (streamed, never loaded whole) and tokenized on their
own, and the readers of every format corpora come in, each item with its location for errors.

Formats: ``.txt`` (one document per file), ``.jsonl`` and ``.json`` (one JSON array, or JSON
lines), each also compressed as ``.gz`` or ``.zst``, and ``.parquet`` (row groups streamed).
Uncompressed ``.txt`` and JSON lines files are cut into byte ranges and ``.parquet`` files into
runs of row groups, so one large file is shared out like many small ones; a compressed file or a
JSON array is one part (read as a stream in order).
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import io
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from titan_lite.data.records import decode_utf8, json_array, json_lines

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPRESSIONS = (".gz", ".zst")
CACHE_SUFFIXES = (".tokens", ".sft")  # the token caches' folders (text.py, instruct.py)
_READ_BYTES = 1 << 20  # plain text is read and decoded a MiB at a time
_INSTALL = "pip install 'titan_lite[data]'"


def optional(module: str, file: str) -> Any:
    """Import ``module`` (a reader's optional dependency), or say in one line how to get it."""
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(f"{file}: reading this format needs {module} ({_INSTALL}, or pip "
                         f"install {module})") from None


def split_suffix(file: str) -> tuple[str, str]:
    """(format suffix, compression suffix or ''): 'a.jsonl.zst' -> ('.jsonl', '.zst')."""
    stem, compression = os.path.splitext(file)
    if compression not in COMPRESSIONS:
        stem, compression = file, ""
    return os.path.splitext(stem)[1], compression


def source_files(paths: list[str], suffixes: tuple[str, ...] = TEXT_SUFFIXES,
                 key: str = "data.paths") -> list[str]:
    """The files of the formats ``suffixes`` (plain or compressed) named by ``paths``: files as
    given, folders searched and sorted."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            found = [path]
        else:
            found = sorted(_walk(path))
        found = [f for f in found if split_suffix(f)[0] in suffixes
                 and (split_suffix(f)[1] == "" or split_suffix(f)[0] != ".parquet")]
        if not found:
            kinds = " or ".join(f"{s}{'' if s == '.parquet' else '[.gz|.zst]'}"
                                for s in suffixes)
            raise ValueError(f"{key}: no {kinds} files in {path!r}")
        files += found
    return files


def describe_files(files: list[str]) -> str:
    """'a.jsonl', or 'a.jsonl and 3 more files', for the log."""
    more = len(files) - 1
    return files[0] + (f" and {more} more file{'s' * (more > 1)}" if more else "")


def _walk(folder: str) -> Iterator[str]:
    """Every file under ``folder``, except in token caches (which may sit beside sources)."""
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.endswith(CACHE_SUFFIXES)]
        yield from (os.path.join(root, name) for name in names)


@dataclass(frozen=True)
class Part:
    """Part ``index`` of ``file``: bytes [start, end) (row groups for Parquet), starting on
    line ``first_line``; ``size`` is what it weighs in the source, for progress."""
    file: str
    index: int
    start: int
    end: int
    first_line: int
    size: int
    last: bool


@dataclass
class Piece:
    """A piece of a .txt document: cut where tokenization cannot change, so the pieces encoded
    one by one give the ids of the whole document."""
    text: str
    first: bool  # the document's start: gets bos (and sentencepiece's prefix)
    last: bool  # the document's end: gets eos


# (text, at) -> the first place at or after ``at`` where the text may be cut without changing
# its ids, or None (tokenizer.safe_cut with the job's tokenizer)
CutFinder = Callable[[str, int], "int | None"]


def open_stream(file: str) -> IO[bytes]:
    """``file``'s bytes, decompressed."""
    compression = split_suffix(file)[1]
    if compression == ".gz":
        return gzip.open(file, "rb")
    if compression == ".zst":
        return io.BufferedReader(_Zstd(file), _READ_BYTES)
    return open(file, "rb")


class _Zstd(io.RawIOBase):
    """A .zst file's bytes, frame after frame; a truncated last frame is an error (zstandard's
    stream reader ends quietly there, which would drop records silently)."""

    def __init__(self, file: str):
        self.zstandard = optional("zstandard", file)
        self.raw = open(file, "rb")
        self.frame = self.zstandard.ZstdDecompressor().decompressobj()
        self.pending, self.fed = b"", False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            chunk = self.raw.read(_READ_BYTES)
            if not chunk:
                if self.fed and not self.frame.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self.fed = True
            self.pending = self.frame.decompress(chunk)
            while self.frame.eof and self.frame.unused_data:  # the next frame starts
                rest = self.frame.unused_data
                self.frame = self.zstandard.ZstdDecompressor().decompressobj()
                self.pending += self.frame.decompress(rest)
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size

    def close(self) -> None:
        self.raw.close()
        super().close()


def plan_parts(file: str, part_bytes: int, cut: CutFinder | None = None) -> list[Part]:
    """``file`` cut into parts of about ``part_bytes``: byte ranges that start on a line (JSON
    lines) or at a tokenization-safe cut (``cut``, text), runs of Parquet row groups, or one
    part (compressed files, a JSON array)."""
    size = os.path.getsize(file)
    fmt, compression = split_suffix(file)
    if fmt == ".parquet":
        return _parquet_parts(file, part_bytes)
    if compression or size == 0 or (fmt != ".txt" and _starts_with_array(file)):
        return [Part(file, 0, 0, size, 1, size, True)]
    starts = [0]
    with open(file, "rb") as fh:
        for nominal in range(part_bytes, size, part_bytes):
            if nominal > starts[-1]:
                start = (_text_cut(fh, nominal, cut) if fmt == ".txt"
                         else _line_start(fh, nominal))
                if start is not None and start < size and start > starts[-1]:
                    starts.append(start)
        lines = _lines_before(fh, starts)
    ends = starts[1:] + [size]
    return [Part(file, i, s, e, line, e - s, i == len(starts) - 1)
            for i, (s, e, line) in enumerate(zip(starts, ends, lines))]


def _line_start(fh: IO[bytes], at: int) -> int:
    """The offset of the first line that starts at or after ``at`` (read in chunks: a line
    may be long)."""
    fh.seek(at - 1)
    while chunk := fh.read(_READ_BYTES):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return fh.tell() - len(chunk) + newline + 1
    return fh.tell()


def _text_cut(fh: IO[bytes], at: int, cut: CutFinder | None) -> int | None:
    """A safe cut of a .txt file at or after byte ``at`` (None: none in the next MiB)."""
    assert cut is not None, "text parts need the tokenizer's cut finder"
    fh.seek(at)
    window = fh.read(_READ_BYTES)
    skip = next((i for i, byte in enumerate(window[:4]) if byte & 0xC0 != 0x80), 0)
    try:  # from the first character boundary, up to the first byte that is not UTF-8
        text = window[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        text = window[skip:skip + e.start].decode("utf-8")
    found = cut(text, 0)
    return None if found is None else at + skip + len(text[:found].encode("utf-8"))


def _lines_before(fh: IO[bytes], offsets: list[int]) -> list[int]:
    """The line number (1-based) at each offset (sorted): one read of the bytes before the
    last."""
    lines, line, at = [], 1, 0
    fh.seek(0)
    for offset in offsets:
        while at < offset:
            chunk = fh.read(min(_READ_BYTES, offset - at))
            line += chunk.count(b"\n")
            at += len(chunk)
        lines.append(line)
    return lines


def _starts_with_array(file: str) -> bool:
    """Whether the first character after any white space is '[' (a JSON array)."""
    with open_stream(file) as fh:
        while chunk := fh.read(2**16):
            if chunk.strip():
                return chunk.lstrip().startswith(b"[")
    return False


def _parquet_parts(file: str, part_bytes: int) -> list[Part]:
    metadata = _parquet(file).metadata
    parts: list[Part] = []
    start, weight = 0, 0
    for group in range(metadata.num_row_groups):
        weight += metadata.row_group(group).total_byte_size
        if weight >= part_bytes or group == metadata.num_row_groups - 1:
            parts.append(Part(file, len(parts), start, group + 1, 1, weight, False))
            start, weight = group + 1, 0
    if not parts:
        return [Part(file, 0, 0, 0, 1, 0, True)]
    parts[-1] = dataclasses.replace(parts[-1], last=True)
    return parts


def _parquet(file: str) -> Any:
    optional("pyarrow", file)
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(file)
    except Exception as e:  # pyarrow's own errors: one line naming the file
        raise ValueError(f"{file}: not a Parquet file pyarrow can read ({_first_line(e)})"
                         ) from None


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


# --- reading a part --------------------------------------------------------------------------

class PartReader:
    """The (location, item) pairs of ``part`` when iterated: a ``Piece`` of a .txt document,
    or a record (a JSON value; a Parquet row as a dict of ``columns``, all when None); and
    ``done``, how much of the part is read, in the units of ``Part.size`` (bytes of the file,
    compressed ones included; a Parquet row group's bytes once it is read), for progress."""

    def __init__(self, part: Part, columns: list[str] | None = None,
                 cut: CutFinder | None = None):
        self.part, self.columns, self.cut, self.done = part, columns, cut, 0

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        part = self.part
        fmt = split_suffix(part.file)[0]
        if fmt == ".txt":
            items = _text_pieces(self)
        elif fmt == ".parquet":
            items = _parquet_rows(self)
        else:
            items = _json_values(self)
        location = None
        try:
            for location, item in items:
                yield location, item
        except _read_errors() as e:  # a corrupt gzip, a truncated zstd frame, a damaged page
            where = (location or "").removeprefix(part.file + ":").strip()
            after = f" after {'line ' * where.isdigit()}{where}" if where else ""
            raise ValueError(f"{part.file}: cannot be read{after} ({_first_line(e)})"
                             ) from None


def _read_errors() -> tuple[type[BaseException], ...]:
    """What the readers' libraries raise on damaged input."""
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    for module, name in (("zstandard", "ZstdError"), ("pyarrow", "ArrowException")):
        try:
            errors.append(getattr(__import__(module), name))
        except ImportError:
            pass
    return tuple(errors)


def _json_values(reader: PartReader) -> Iterator[tuple[str, Any]]:
    part = reader.part
    with open_stream(part.file) as fh:
        if part.start == 0 and _starts_with_array(part.file):  # one part, streamed
            values = json_array(fh, part.file)
        else:
            limit = None
            if not split_suffix(part.file)[1]:  # a byte range of a plain file
                fh.seek(part.start)
                limit = part.end - part.start
            values = json_lines(fh, part.file, part.first_line, limit)
        for line, value in values:
            reader.done = _position(fh) - part.start
            yield f"{part.file}:{line}", value


def _position(stream: IO[bytes]) -> int:
    """How far into its file (compressed bytes for .gz/.zst) ``stream`` has read."""
    if isinstance(stream, gzip.GzipFile):
        return stream.fileobj.tell()
    raw = getattr(stream, "raw", None)
    return raw.raw.tell() if isinstance(raw, _Zstd) else stream.tell()


def records(file: str) -> Iterator[tuple[str, dict]]:
    """(location, record) of each record of ``file``, read whole (small files: tests, the
    examples); a ValueError names a value that is not a JSON object."""
    for part in plan_parts(file, 1 << 62):
        for location, value in PartReader(part):
            yield location, require_object(location, value)


def require_object(location: str, value: Any) -> dict:
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{location}: a record must be a JSON object, not {kind}")
    return value


def _parquet_rows(reader: PartReader) -> Iterator[tuple[str, Any]]:
    part, columns = reader.part, reader.columns
    parquet = _parquet(part.file)
    names = parquet.schema_arrow.names
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise ValueError(f"{part.file}: no column {missing[0]!r} (columns: {', '.join(names)})")
    for group in range(part.start, part.end):
        try:
            table = parquet.read_row_group(group, columns=columns)
        except Exception as e:
            raise ValueError(f"{part.file}: row group {group} cannot be read "
                             f"({_first_line(e)})") from None
        row = 0
        for batch in table.to_batches(max_chunksize=4096):
            for record in batch.to_pylist():
                yield f"{part.file}: row group {group}, row {row}", record
                row += 1
        reader.done += parquet.metadata.row_group(group).total_byte_size


def _text_pieces(reader: PartReader, piece_chars: int = _READ_BYTES
                 ) -> Iterator[tuple[str, Piece]]:
    """The part's text in pieces of about ``piece_chars``, each ending at a safe cut."""
    part, cut = reader.part, reader.cut
    assert cut is not None, "text pieces need the tokenizer's cut finder"
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, line, first, wanted = "", part.first_line, part.start == 0, piece_chars
    with open(part.file, "rb") as fh:
        fh.seek(part.start)
        left = part.end - part.start
        while left > 0 or text:
            if left > 0 and len(text) < 2 * wanted:
                raw = fh.read(min(_READ_BYTES, left))
                if not raw:
                    raise ValueError(f"{part.file}: shorter than when the cache was planned "
                                     "(changed while being read?)")
                left -= len(raw)
                try:
                    text += decoder.decode(raw, final=left == 0)
                except UnicodeDecodeError as e:  # name its line, as a whole-file read does
                    decode_utf8(e.object, part.file, line + text.count("\n"))
                    raise ValueError(f"{part.file}: not UTF-8 text") from None
                continue
            end = len(text) if left == 0 else cut(text, wanted)
            if end is None:  # no safe cut near: read on (this piece grows)
                wanted *= 2
                continue
            wanted = piece_chars
            piece = Piece(text[:end], first, part.last and left == 0 and end == len(text))
            reader.done = part.end - part.start - left
            yield f"{part.file}:{line}", piece
            line += piece.text.count("\n")
            text, first = text[end:], False
    if part.start == 0 and part.end == 0:  # an empty file: an empty document
        yield f"{part.file}:1", Piece("", True, True)
