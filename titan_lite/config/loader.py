"""Reading a job: TOML file plus ``--section.key value`` overrides -> a validated JobConfig.

Every problem is collected and reported at once, one line each, naming the file or flag and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import typing
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on Python < 3.11
    import tomli as tomllib

from titan_lite.config.schema import DEFAULT_CONFIG, JobConfig


class ConfigError(Exception):
    """One or more configuration problems, one line each."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------------
# Schema helpers


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(JobConfig)}  # type: ignore


def _keys(section_cls: type) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(section_cls)
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    for name, f in fields.items():
        f.type = hints[name]
    return fields


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


def _did_you_mean(name: str, candidates: list[str]) -> str:
    by_lower = {c.lower(): c for c in candidates}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3,
                                                             cutoff=0.6)]
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _from_string(text: str, tp: Any) -> Any:
    """Parse a command-line string into the field's type; ValueError when it does not fit."""
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return [_from_string(part.strip(), item) for part in text.split(",") if part.strip()]
    if tp is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError
    return tp(text)


def _check_toml_value(value: Any, tp: Any) -> Any:
    """Return the TOML value in the field's type; ValueError when it does not fit."""
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ValueError
        return [_check_toml_value(v, typing.get_args(tp)[0]) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not tp:  # bool is an int subclass: compare exact types
        raise ValueError
    return value


def _check_range(value: Any, f: dataclasses.Field) -> str | None:
    meta = f.metadata
    if isinstance(value, list):  # choices apply to each item
        return next(filter(None, (_check_range(item, f) for item in value)), None)
    if meta["choices"] is not None and value not in meta["choices"]:
        return (f"{value!r} is not one of {', '.join(map(repr, meta['choices']))}"
                + _did_you_mean(str(value), [str(c) for c in meta["choices"]]))
    if meta["min"] is not None and value < meta["min"]:
        return f"{value!r} is below the minimum {meta['min']}"
    if meta["max"] is not None and value > meta["max"]:
        return f"{value!r} is above the maximum {meta['max']}"
    return None


# ---------------------------------------------------------------------------------------------
# Loading


def _parse_argv(argv: list[str], problems: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Split argv into the --config path and (dotted key, raw value) overrides."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            problems.append(f"command line: unexpected argument {arg!r} "
                            "(options look like --section.key value)")
            i += 1
            continue
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if next_is_value else "true"  # a bare flag switches a bool on
            i += 1 if next_is_value else 0
        i += 1
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
    return config_path, overrides


def _lookup(dotted: str, where: str, problems: list[str]) -> tuple[str, dataclasses.Field] | None:
    sections = _sections()
    section, _, key = dotted.partition(".")
    if section not in sections:
        hint = _did_you_mean(section, list(sections))
        problems.append(f"{where}: unknown section {section!r}{hint}")
        return None
    fields = _keys(sections[section])
    if key not in fields:
        hint = _did_you_mean(key, list(fields))
        problems.append(f"{where}: unknown key {key!r} in section [{section}]{hint}")
        return None
    return section, fields[key]


def _set(values: dict[str, dict[str, Any]], dotted: str, raw: Any, parse, where: str,
         problems: list[str]) -> None:
    """Parse ``raw`` for the key ``section.key`` and record it, or record why not."""
    found = _lookup(dotted, where, problems)
    if found is None:
        return
    section, f = found
    try:
        value = parse(raw, f.type)
    except ValueError:
        problems.append(f"{where}: expected {_type_name(f.type)}, got {raw!r}")
        return
    problem = _check_range(value, f)
    if problem:
        problems.append(f"{where}: {problem}")
    else:
        values.setdefault(section, {})[f.name] = value


def _read_toml(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        problems.append(f"{path}: config file not found")
    except IsADirectoryError:
        problems.append(f"{path}: is a folder, expected a .toml file")
    except tomllib.TOMLDecodeError as e:
        problems.append(f"{path}: invalid TOML: {e}")
    return {}


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Build the JobConfig from ``--config FILE`` (default debug model) and overrides.

    Raises ConfigError listing every problem found.
    """
    argv = sys.argv[1:] if argv is None else argv
    problems: list[str] = []
    config_path, overrides = _parse_argv(argv, problems)
    config_path = config_path or DEFAULT_CONFIG
    values: dict[str, dict[str, Any]] = {}
    for section, table in _read_toml(config_path, problems).items():
        if not isinstance(table, dict):
            problems.append(f"{config_path}: {section!r} must be a [section] table")
            continue
        for key, raw in table.items():
            _set(values, f"{section}.{key}", raw, _check_toml_value,
                 f"{config_path}: [{section}] {key}", problems)
    for dotted, raw in overrides:
        _set(values, dotted, raw, _from_string, f"--{dotted}", problems)
    if problems:
        raise ConfigError(problems)
    return JobConfig(**{name: cls(**values.get(name, {})) for name, cls in _sections().items()})


def expand_bare_keys(argv: list[str], sections: tuple[str, ...]) -> list[str]:
    """``--key value`` -> ``--section.key value`` for the keys of ``sections`` (a tool's own
    sections, e.g. generate's [generation]); every other argument unchanged."""
    classes = _sections()
    owner = {name: section for section in sections for name in _keys(classes[section])}
    expanded = []
    for arg in argv:
        name = arg[2:].partition("=")[0]
        expanded.append(f"--{owner[name]}.{arg[2:]}" if arg.startswith("--") and name in owner
                        else arg)
    return expanded


def help_text() -> str:
    """--help: every key with its type, default and help, generated from the dataclasses."""
    lines = ["usage: python -m titan_lite.train [--config FILE] [--section.key VALUE ...]",
             "",
             f"--config FILE  TOML job config (default: {DEFAULT_CONFIG}).",
             "Every key below can be set in the file's [section] or overridden on the command",
             "line; lists are comma-separated, booleans true/false (a bare flag means true).",
             ""]
    for section, cls in _sections().items():
        lines.append(f"[{section}]")
        for name, f in _keys(cls).items():
            default = f.default_factory() if callable(f.default_factory) else f.default
            extra = f" Choices: {', '.join(map(str, f.metadata['choices']))}." \
                if f.metadata["choices"] else ""
            lines.append(f"  --{section}.{name} ({_type_name(f.type)}, default {default!r})")
            lines.append(f"      {f.metadata['help']}{extra}")
        lines.append("")
    return "\n".join(lines)
