"""Reading JSON lines and JSON arrays, and text as UTF-8: every record or a
ValueError naming the file and line, never a record silently dropped or a bare traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import IO, Any


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


def json_array(text: str, file: str) -> Iterator[tuple[int, Any]]:
    """(line number, item) of the JSON array ``text``, with the line each item starts on."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0  # the line of text[counted] (counted on as we go: linear time)
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text):
            raise ValueError(f"{file}: the JSON array is not closed with ']'")
        line, counted = line + text.count("\n", counted, pos), pos
        if text[pos] == "]":
            rest = text[pos + 1:]
            if rest.strip():
                extra = line + rest[:len(rest) - len(rest.lstrip())].count("\n")
                raise ValueError(f"{file}:{extra}: text after the JSON array's closing ']' (a "
                                 "file holds one array of records, or one record per line)")
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{line + text.count(chr(10), counted, e.pos)}: invalid "
                             f"JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{file}:{line}: invalid JSON (nested too deeply)") from None
        yield line, item
