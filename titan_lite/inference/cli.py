"""The command line shared by the tools that answer with a job's model."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch.distributed as dist

from titan_lite.checkpoint import CheckpointError
from titan_lite.config import ConfigError, JobConfig, expand_bare_keys, help_text, load_config
from titan_lite.runtime.distributed import shutdown_and_exit

def answer_cli(run_job: Callable[[JobConfig], object], argv: list[str] | None, module: str,
               sections: tuple[str, ...]) -> None:
    """The command line of a tool that answers with a job's model (``module``: generate,
    predict, evaluate): bare ``--key`` options of ``sections``, --help, and one line + exit
    status 2 for a bad config, bad input or a checkpoint that is not this model's."""
    argv = expand_bare_keys(sys.argv[1:] if argv is None else argv, sections)
    if "--help" in argv or "-h" in argv:
        print(help_text().replace("titan_lite.train", module))
        sys.exit(0)
    code = 0
    try:
        run_job(load_config(argv))
    except ConfigError as e:
        for problem in e.problems:
            print(f"config error: {problem}", file=sys.stderr)
        code = 2
    except (ValueError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    if dist.is_initialized():  # (started by torchrun: leave as a trainer's rank does)
        shutdown_and_exit(code)
    if code:
        sys.exit(code)
