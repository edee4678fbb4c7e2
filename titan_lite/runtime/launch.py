"""torchrun for run_train.sh, without torchrun's traceback when the trainer refuses a job.

A worker that stops on bad input prints its one-line reason and exits 2; torchrun would then
add a ChildFailedError traceback and exit 1. This runs torchrun's own launcher and leaves with
2 when every failed worker said 2 (1 for any other failure), letting the workers' lines speak.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

BAD_INPUT = 2  # the trainer's exit status for a job it refuses (config, data, fit)


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # the agent's own "failed (exitcode: 2)" report would repeat what the worker said
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        failed = {code for code in codes if code > 0}  # others were stopped by the agent
        sys.exit(BAD_INPUT if failed == {BAD_INPUT} else 1)


if __name__ == "__main__":
    main()
