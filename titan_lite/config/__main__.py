"""`python -m titan_lite.config --config FILE [overrides]`: check a job without launching it.

run_train.sh does this first, with WORLD_SIZE=NGPU, so mistakes never reach torchrun; with
``--get SECTION.KEY`` it prints that key's value (run_train.sh: job.dump_folder) instead of
"config OK".
"""

import sys

from titan_lite.build.checks import parse_or_exit

argv = sys.argv[1:]
get = None
if "--get" in argv:
    at = argv.index("--get")
    get, argv = argv[at + 1], argv[:at] + argv[at + 2:]
cfg = parse_or_exit(argv)
if get is None:
    print("config OK")
else:
    section, key = get.split(".", 1)
    print(getattr(getattr(cfg, section), key))
