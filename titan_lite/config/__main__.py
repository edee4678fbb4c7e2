"""`python -m titan_lite.config --config FILE [overrides]`: check a job without launching it.

run_train.sh does this first, with WORLD_SIZE=NGPU, so mistakes never reach torchrun.
"""

from titan_lite.config.checks import parse_or_exit

parse_or_exit()
print("config OK")
