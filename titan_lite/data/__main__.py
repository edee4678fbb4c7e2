"""``python -m titan_lite.data prepare --config JOB.toml [--section.key VALUE ...]``: tokenize a
job's training and validation data into its caches ahead of time, on any CPU machine, with
progress and an ETA. A killed run resumes from its finished parts; several runs at once (on
nodes sharing the cache folder) share the work. Training then finds the caches and starts at
once."""

from __future__ import annotations

import sys

from titan_lite.config import ConfigError, help_text, load_config
from titan_lite.data import data_caches
from titan_lite.data.tokenizer import build_tokenizer

USAGE = "usage: python -m titan_lite.data prepare [--config FILE] [--section.key VALUE ...]"


def prepare(argv: list[str]) -> None:
    cfg = load_config(argv)
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    train, held = data_caches(cfg, tokenizer, lambda message: print(message, flush=True))
    print(f"training data: {', '.join(train)}")
    if held is not None:
        print(f"validation data: {held}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--help"], ["-h"]):
        print(f"{USAGE}\n\n{__doc__}")
        sys.exit(0)
    if argv[:1] != ["prepare"]:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    if "--help" in argv or "-h" in argv:
        print(help_text().replace("titan_lite.train", "titan_lite.data prepare"))
        sys.exit(0)
    try:
        prepare(argv[1:])
    except ConfigError as e:
        for problem in e.problems:
            print(f"config error: {problem}", file=sys.stderr)
        sys.exit(2)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
