"""How close is ``--estimate`` to the real thing? Trains each row for real on this machine and
prints the estimator's peak next to the measured one.

    python bench/estimate_accuracy.py                 # every row, a few minutes on 2 CPU cores
    python bench/estimate_accuracy.py --rows debug-1rank,debug-2rank-fsdp

Measured: the trainer's own peak over its steps (JSONL ``peak_memory_gib``, all ranks, the
highest): on CPU the peak bytes of live tensors, the same dispatch-mode count the estimator
runs on fake tensors. On CPU host and device are one memory, so the comparison is of the
estimator's combined peak. Not a test: the table goes to docs/will-it-fit.md by hand.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from titan_lite.config import load_config  # noqa: E402
from titan_lite.estimate import GIB, estimate_memory  # noqa: E402

DEBUG = ["--model.flavor", "debugmodel", "--training.local_batch_size", "4",
         "--training.seq_len", "1024"]
SMALL = ["--model.flavor", "small", "--training.local_batch_size", "2",
         "--training.seq_len", "512"]
PP = ["--parallelism.pipeline_parallel_degree", "2",
      "--parallelism.pipeline_parallel_microbatch_size", "1"]
OFFLOAD = ["--training.enable_cpu_offload", "true"]
# name -> (processes, overrides)
ROWS: dict[str, tuple[int, list[str]]] = {
    "debug-1rank": (1, DEBUG),
    "debug-1rank-ac-op": (1, [*DEBUG, "--activation_checkpoint.mode", "selective"]),
    "debug-1rank-ac-every-2": (1, [*DEBUG, "--activation_checkpoint.mode", "selective",
                                   "--activation_checkpoint.selective_ac_option", "2"]),
    "debug-1rank-ac-full": (1, [*DEBUG, "--activation_checkpoint.mode", "full"]),
    "debug-1rank-offload": (1, [*DEBUG, *OFFLOAD]),
    "debug-1rank-bf16": (1, [*DEBUG, "--training.mixed_precision_param", "bfloat16"]),
    "debug-1rank-accum-2": (1, [*DEBUG, "--training.global_batch_size", "8"]),
    "debug-2rank-fsdp": (2, DEBUG),
    "debug-2rank-fsdp-ac-full": (2, [*DEBUG, "--activation_checkpoint.mode", "full"]),
    "debug-2rank-fsdp-offload": (2, [*DEBUG, *OFFLOAD]),
    "debug-2rank-fsdp-bf16": (2, [*DEBUG, "--training.mixed_precision_param", "bfloat16"]),
    "debug-2rank-tp": (2, [*DEBUG, "--parallelism.tensor_parallel_degree", "2"]),
    "debug-2rank-pp-1f1b": (2, [*DEBUG, *PP, "--parallelism.pipeline_parallel_schedule",
                                "1F1B"]),
    "debug-2rank-pp-gpipe": (2, [*DEBUG, *PP, "--parallelism.pipeline_parallel_schedule",
                                 "GPipe"]),
    "debug-2rank-pp-interleaved": (2, [*DEBUG, *PP]),
    "small-1rank": (1, SMALL),
    "small-1rank-ac-full": (1, [*SMALL, "--activation_checkpoint.mode", "full"]),
    "small-1rank-offload": (1, [*SMALL, *OFFLOAD]),
    "small-2rank-fsdp": (2, SMALL),
    "small-2rank-fsdp-offload": (2, [*SMALL, *OFFLOAD]),
}


def measured_peak_gib(ranks: int, overrides: list[str], folder: str, steps: int) -> float:
    cmd = ["./run_train.sh", "--training.steps", str(steps), "--metrics.log_freq", "1",
           "--metrics.jsonl_all_ranks", "true", "--job.dump_folder", folder, *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, NGPU=str(ranks)),
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"training failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    peaks = []
    for path in glob.glob(os.path.join(folder, "metrics", "rank*.jsonl")):
        with open(path) as fh:
            peaks += [json.loads(line)["peak_memory_gib"] for line in fh]
    return max(peaks)


def estimated_peak_gib(ranks: int, overrides: list[str]) -> float:
    estimate = estimate_memory(load_config(overrides), ranks)
    return max(r.total_peak for r in estimate.ranks) / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"any of {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    os.chdir(REPO)  # the configs' relative paths
    print("| row | ranks | estimated GiB | measured GiB | error |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for name in args.rows.split(","):
        ranks, overrides = ROWS[name]
        with tempfile.TemporaryDirectory() as tmp:
            measured = measured_peak_gib(ranks, overrides, tmp, args.steps)
        estimated = estimated_peak_gib(ranks, overrides)
        error = (estimated - measured) / measured
        worst = max(worst, abs(error))
        print(f"| {name} | {ranks} | {estimated:.3f} | {measured:.3f} | {100 * error:+.1f}% |",
              flush=True)
    print(f"\nlargest error: {100 * worst:.1f}%")


if __name__ == "__main__":
    main()
