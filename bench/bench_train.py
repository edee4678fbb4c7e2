"""Throughput benchmark: runs real training through run_train.sh and prints a table.

    python bench/bench_train.py            # the default rows below, a few minutes on 2 CPU cores
    python bench/bench_train.py --steps 6 --rows debug-1rank,small-1rank

Each row trains for --steps optimizer steps and reports the mean over all but the first step
(start-up and warm-up excluded) of tokens/s per rank, MFU and the optimizer step's time, and
the peak memory, as the trainer's own JSONL metrics record them (on CPU: the peak bytes of live
tensors; on CUDA: max allocated). Not a test: the figures go to docs/performance.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# torchtitan's debug-model shape: dim 256, 6 layers, batch 8 x 2048 per rank.
DEBUG = ["--model.flavor", "debugmodel", "--training.local_batch_size", "8",
         "--training.seq_len", "2048"]
SMALL = ["--model.flavor", "small", "--training.local_batch_size", "2",
         "--training.seq_len", "1024"]
# Instruction data (the shipped Alpaca example), packed into the same 8 x 2048 rows with the
# document mask; tokens/s counts every position of a row, padding included.
SFT = [*DEBUG, "--data.format", "alpaca", "--data.paths", "titan_lite/assets/data/kjv_sft.jsonl"]
LORA = ["--lora.enable", "true", "--lora.rank", "16", "--lora.alpha", "32"]
# name -> (processes, overrides)
ROWS: dict[str, tuple[int, list[str]]] = {
    "debug-1rank": (1, DEBUG),
    "debug-1rank-untracked": (1, [*DEBUG, "--metrics.track_cpu_memory", "false"]),
    "debug-1rank-sft": (1, SFT),
    "debug-2rank-fsdp-sft": (2, SFT),
    "debug-1rank-ac-selective": (1, [*DEBUG, "--activation_checkpoint.mode", "selective"]),
    "debug-1rank-ac-full": (1, [*DEBUG, "--activation_checkpoint.mode", "full"]),
    "debug-1rank-offload": (1, [*DEBUG, "--training.enable_cpu_offload", "true"]),
    "debug-2rank-fsdp": (2, DEBUG),
    "debug-2rank-fsdp-offload": (2, [*DEBUG, "--training.enable_cpu_offload", "true"]),
    "debug-2rank-ddp": (2, [*DEBUG, "--parallelism.dp_replicate", "2",
                            "--parallelism.dp_shard", "1"]),
    "debug-1rank-bf16": (1, [*DEBUG, "--training.mixed_precision_param", "bfloat16"]),
    # torch.compile per block + cross entropy (the first, compiling step is not counted)
    "debug-1rank-compile": (1, [*DEBUG, "--training.compile", "true"]),
    "debug-2rank-fsdp-compile": (2, [*DEBUG, "--training.compile", "true"]),
    # ~79M parameters (dim 768, 12 layers, GQA 12/4 heads): weights, gradients and AdamW
    # states (1.2 GiB) outweigh the activations, so sharding shows.
    "small-1rank": (1, SMALL),
    "small-2rank-fsdp": (2, SMALL),
    "small-2rank-ddp": (2, [*SMALL, "--parallelism.dp_replicate", "2",
                            "--parallelism.dp_shard", "1"]),
    # Fine-tuning methods side by side on the same model and batch: every weight (float32
    # weights, gradients, AdamW), LoRA (rank-16 adapters on the blocks' linears, bfloat16
    # frozen base) and QLoRA (the blocks' linears in NF4, dequantised in forward and backward).
    "small-1rank-lora": (1, [*SMALL, *LORA]),
    "small-1rank-qlora": (1, [*SMALL, *LORA, "--lora.quantize_base", "nf4"]),
}
DEFAULT_ROWS = ("debug-1rank,debug-1rank-untracked,debug-1rank-sft,debug-1rank-ac-selective,"
                "debug-1rank-ac-full,"
                "debug-1rank-offload,debug-2rank-fsdp,debug-2rank-fsdp-sft,debug-2rank-fsdp-offload,"
                "debug-2rank-ddp,"
                "small-1rank,small-2rank-fsdp,small-2rank-ddp,small-1rank-lora,"
                "small-1rank-qlora")


def run_row(name: str, steps: int, folder: str) -> dict[str, float | str]:
    ngpu, overrides = ROWS[name]
    cmd = ["./run_train.sh", "--training.steps", str(steps), "--metrics.log_freq", "1",
           "--lr_scheduler.warmup_steps", "1", "--job.dump_folder", folder, *overrides]
    env = dict(os.environ, NGPU=str(ngpu))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    with open(os.path.join(folder, "metrics", "rank0.jsonl")) as fh:
        records = [json.loads(line) for line in fh][1:]  # drop the warm-up step

    def mean(key: str) -> float:
        return sum(r[key] for r in records) / len(records)

    return {"row": name, "ranks": ngpu, "tokens/s/rank": mean("tokens_per_s"),
            "tokens/s total": mean("tokens_per_s") * ngpu, "MFU %": mean("mfu_pct"),
            "optimizer s/step": mean("optimizer_s"),
            "peak mem GiB": max(r["peak_memory_gib"] for r in records),
            "memory": records[-1]["memory_kind"], "final loss": records[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"any of {', '.join(ROWS)}")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.rows.split(","):
            results.append(run_row(name, args.steps, os.path.join(tmp, name)))
            print(f"done: {name}", file=sys.stderr, flush=True)
    columns = list(results[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in results:
        cells = [_cell(v) for v in r.values()]
        print("| " + " | ".join(cells) + " |")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


if __name__ == "__main__":
    main()
