"""Reading records from JSON-lines and JSON files, and text as UTF-8: every record or a
ValueError naming the file and line, never a record silently dropped or a bare traceback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


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


def read_text(file: str) -> str:
    """The whole of ``file`` as UTF-8 text."""
    with open(file, "rb") as fh:
        return decode_utf8(fh.read(), file)


def _loads(text: str, file: str, line: int) -> Any:
    """The JSON value of line ``line`` of ``file``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{line}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise ValueError(f"{file}:{line}: invalid JSON (nested too deeply)") from None


def json_lines(file: str) -> Iterator[tuple[int, Any, int]]:
    """(line number, value, bytes of the file read so far) for each non-blank line of a
    JSON-lines file."""
    done = 0
    with open(file, "rb") as fh:
        for line_no, raw in enumerate(fh, 1):
            done += len(raw)
            if raw.strip():
                yield line_no, _loads(decode_utf8(raw, file, line_no), file, line_no), done


def _json_array(text: str, file: str) -> Iterator[tuple[int, Any]]:
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


def _starts_with_array(file: str) -> bool:
    """Whether the first character after any white space is '[' (a JSON array)."""
    with open(file, "rb") as fh:
        while chunk := fh.read(2**16):
            if chunk.strip():
                return chunk.lstrip().startswith(b"[")
    return False


def iter_records(file: str) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each record, a JSON object, of ``file``: one JSON array of
    records, or JSON lines (one record per line; also in a ``.json`` file, as ``datasets``'
    to_json writes them)."""
    if _starts_with_array(file):
        records: Iterator[tuple[int, Any]] = _json_array(read_text(file), file)
    else:
        records = ((line, value) for line, value, _ in json_lines(file))
    for line, record in records:
        if not isinstance(record, dict):
            kind = "an array" if isinstance(record, list) else type(record).__name__
            raise ValueError(f"{file}:{line}: a record must be a JSON object, not {kind}")
        yield line, record
