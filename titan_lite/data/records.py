"""Reading JSON lines and JSON arrays, and text as UTF-8: every record or a
ValueError naming the file and line, never a record silently dropped or a bare traceback."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import IO, Any

_READ_BYTES = 1 << 20


def decode_utf8(raw: bytes, file: str, first_line: int = 1) -> str:
    """``raw`` (the bytes of ``file`` from line ``first_line`` on) as text; ValueError naming
    the line of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw.count(b"\n", 0, e.start)
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{file}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                         f"{column}); convert the file to UTF-8") from None


def _loads(text: str, file: str, line: int) -> Any:
    """The JSON value of line ``line`` of ``file``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{line}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{file}:{line}: invalid JSON (nested too deeply)") from None


def json_lines(stream: IO[bytes], file: str, first_line: int = 1, limit: int | None = None
               ) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of the JSON-lines ``stream`` (``file``
    from line ``first_line`` on), up to ``limit`` bytes (None: to the end)."""
    done = 0
    for line_no, raw in enumerate(stream, first_line):
        if limit is not None and done >= limit:
            return
        done += len(raw)
        if raw.strip():
            yield line_no, _loads(decode_utf8(raw, file, line_no), file, line_no)


class _Text:
    """A byte stream's UTF-8 text, read a MiB at a time into a window that drops what has
    been consumed, with the line number of any position still in the window."""

    def __init__(self, stream: IO[bytes], file: str):
        self.stream, self.file = stream, file
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text, self.eof = "", False
        self.line, self.counted = 1, 0  # the line of text[counted] (counted on: linear time)

    def line_at(self, pos: int) -> int:
        self.line, self.counted = self.line + self.text.count("\n", self.counted, pos), pos
        return self.line

    def more(self, pos: int) -> int:
        """Read on (False at the end); returns ``pos``'s new index (the window moved)."""
        self.line_at(pos)
        self.text, self.counted = self.text[pos:], 0
        raw = self.stream.read(_READ_BYTES)
        self.eof = not raw
        try:
            self.text += self.utf8.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:
            decode_utf8(e.object, self.file, self.line + self.text.count("\n"))
            raise
        return 0


def json_array(stream: IO[bytes], file: str) -> Iterator[tuple[int, Any]]:
    """(line number, item) of the JSON array in ``stream``, with the line each item starts
    on, streamed: an item is decoded once the text holds it whole (an item that stops at the
    window's end is decoded again with more text, so a number is never cut short)."""
    decoder = json.JSONDecoder()
    reader = _Text(stream, file)
    pos = reader.more(0)
    while not reader.eof and "[" not in reader.text:
        pos = reader.more(len(reader.text))
    pos = reader.text.index("[") + 1
    while True:
        while True:
            while pos < len(reader.text) and reader.text[pos] in " \t\r\n,":
                pos += 1
            if pos < len(reader.text) or reader.eof:
                break
            pos = reader.more(pos)
        if pos >= len(reader.text):
            raise ValueError(f"{file}: the JSON array is not closed with ']'")
        line = reader.line_at(pos)
        if reader.text[pos] == "]":
            _nothing_after(reader, pos + 1, file)
            return
        while True:
            try:
                item, end = decoder.raw_decode(reader.text, pos)
                if end < len(reader.text) or reader.eof:
                    break
            except json.JSONDecodeError as e:
                if reader.eof:
                    raise ValueError(f"{file}:{reader.line_at(e.pos)}: invalid JSON ({e.msg})"
                                     ) from None
            except RecursionError:
                raise ValueError(f"{file}:{line}: invalid JSON (nested too deeply)") from None
            pos = reader.more(pos)
        pos = end
        yield line, item


def _nothing_after(reader: _Text, pos: int, file: str) -> None:
    """Only white space may follow the array's closing ']'."""
    while True:
        rest = reader.text[pos:]
        if rest.strip():
            extra = reader.line_at(pos + len(rest) - len(rest.lstrip()))
            raise ValueError(f"{file}:{extra}: text after the JSON array's closing ']' (a "
                             "file holds one array of records, or one record per line)")
        if reader.eof:
            return
        pos = reader.more(len(reader.text))
