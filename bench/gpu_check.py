"""GPU acceptance check: the first command to run on a machine with a GPU.

    python bench/gpu_check.py                # every case the machine's GPUs allow (~8 min, H100)
    python bench/gpu_check.py --dry-run      # the commands, each config parsed (CI runs this)
    python bench/gpu_check.py --cases 1b-bf16,generate --out /tmp/gpu_check

Each case runs the trainer (or generation) through run_train.sh for a few steps, with random
weights and the shipped test tokenizer and data (no downloads), under its own timeout. A case
passes when it exits 0 and logs a finite loss for its last step (generation: an answer). The
table gives, per case, tokens/s per GPU and MFU (mean over the steps after the first, which
compiles and warms up), the peak of `torch.cuda.max_memory_allocated` since training began,
the estimator's traced peak for the same job (`python -m titan_lite.estimate`, computed on the
CPU cores while the GPU runs the cases) and the wall time. Cases needing two GPUs run when two
are visible. Not a test: its table goes to docs/gpu.md with the card's name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TOKENIZER = "titan_lite/assets/tokenizers/test_tiktoken.model"
SFT_DATA = "titan_lite/assets/data/kjv_sft.jsonl"
SHORT = ["--training.steps", "6", "--metrics.log_freq", "1", "--lr_scheduler.warmup_steps", "1",
         "--validation.split", "0", "--validation.interval", "0", "--validation.steps", "-1",
         "--validation.sample_prompts", ""]
PRETRAIN_1B = ["--config", "train_configs/debug_model.toml", "--model.flavor", "1B",
               "--training.seq_len", "2048", "--training.local_batch_size", "4",
               "--training.mixed_precision_param", "bfloat16"]
SFT_1B = ["--config", "train_configs/debug_sft.toml", "--model.flavor", "1B",
          "--training.seq_len", "2048", "--training.local_batch_size", "4",
          "--training.mixed_precision_param", "bfloat16"]
# The shipped 8B fine-tuning configs as users run them, on a random base, the test tokenizer
# (it has Llama 3's chat tokens) and the shipped Alpaca data; no accumulation, no checkpoints.
SHIPPED_8B = ["--model.init_from", "", "--tokenizer.path", TOKENIZER, "--data.paths", SFT_DATA,
              "--data.format", "alpaca", "--training.global_batch_size", "-1",
              "--checkpoint.enable", "false"]


@dataclass
class Case:
    name: str
    gpus: int
    argv: list[str]  # run_train.sh's arguments (or generate's, with module set)
    timeout_s: int = 150
    module: str = ""  # run this module instead of training (generation)
    what: str = ""  # what it exercises, for the table's notes

    def command(self, folder: str) -> list[str]:
        if self.module:
            return [sys.executable, "-m", self.module, *self.argv, "--job.dump_folder", folder]
        return ["./run_train.sh", *self.argv, *SHORT, "--job.dump_folder", folder]


CASES = [
    Case("1b-bf16", 1, [*PRETRAIN_1B, "--checkpoint.enable", "true"],
         what="pretraining, FSDP-less bf16 autocast, SDPA, a checkpoint for generate"),
    Case("sft-flex-selective-op", 1, [*SFT_1B, "--activation_checkpoint.mode", "selective"],
         what="packed samples: compiled FlexAttention + block mask; op SAC saves flex"),
    Case("sft-flex-full-ac", 1, [*SFT_1B, "--activation_checkpoint.mode", "full"],
         what="FlexAttention under full AC"),
    Case("compile", 1, [*PRETRAIN_1B, "--training.compile", "true"], timeout_s=240,
         what="torch.compile per block + loss"),
    Case("lora-8b-offload", 1, ["--config", "train_configs/llama3_8b_lora.toml", *SHIPPED_8B],
         timeout_s=240, what="shipped 8B LoRA: dropout, embedding on host, full AC, "
                             "activation offload, FlexAttention"),
    Case("qlora-8b-nf4", 1, ["--config", "train_configs/llama3_8b_qlora.toml", *SHIPPED_8B],
         timeout_s=240, what="shipped 8B QLoRA: NF4 base on CUDA"),
    Case("fp16-cpu-offload", 1, [*PRETRAIN_1B, "--training.mixed_precision_param", "float16",
                                 "--training.enable_cpu_offload", "true"],
         what="float16 loss scaling with FSDP CPU offload (host gradients)"),
    Case("offload-in-backward-int8", 1, [*PRETRAIN_1B, "--training.enable_cpu_offload", "true",
                                         "--optimizer.in_backward", "true", "--training.max_norm",
                                         "0", "--optimizer.state_dtype", "int8"],
         what="AdamW stepped on the host during backward (synchronous D2H), int8 moments"),
    Case("deterministic", 1, [*PRETRAIN_1B, "--job.deterministic", "true"],
         what="CUBLAS_WORKSPACE_CONFIG, deterministic kernels"),
    Case("generate", 1, ["--config", "train_configs/debug_model.toml", "--model.flavor", "1B",
                         "--training.seq_len", "2048", "--generation.prompt",
                         "In the beginning", "--generation.max_new_tokens", "32"],
         module="titan_lite.generate", what="KV-cache generation from 1b-bf16's checkpoint"),
    Case("2gpu-fsdp-cpu-offload", 2, [*PRETRAIN_1B, "--training.enable_cpu_offload", "true"],
         what="FSDP2 + CPU offload over NCCL + gloo (host gradient norm)"),
    Case("2gpu-offload-in-backward", 2, [*PRETRAIN_1B, "--training.enable_cpu_offload", "true",
                                         "--optimizer.in_backward", "true", "--training.max_norm",
                                         "0"],
         what="the step in backward on 2 GPUs: host norm all-reduce over gloo"),
    Case("2gpu-lora", 2, [*SFT_1B, "--lora.enable", "true", "--lora.dropout", "0.05",
                          "--activation_checkpoint.mode", "full"],
         what="LoRA with dropout under FSDP2 on 2 GPUs"),
]


@dataclass
class Result:
    case: Case
    status: str = "not run"
    tokens_per_s: float | None = None
    mfu_pct: float | None = None
    peak_gib: float | None = None
    estimate_gib: float | None = None
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def case_folder(out: str, case: Case) -> str:
    # generate reads the checkpoint 1b-bf16 wrote
    return os.path.join(out, "1b-bf16" if case.name == "generate" else case.name)


def estimate(argv: list[str], gpus: int) -> float:
    """The estimator's traced device peak (GiB) for this job on ``gpus`` GPUs."""
    os.chdir(REPO)
    from titan_lite.config import load_config
    from titan_lite.estimate.trace import GIB, estimate_memory

    return estimate_memory(load_config([*argv, *SHORT]), gpus).worst.device_peak / GIB


def run_case(case: Case, out: str) -> Result:
    result = Result(case)
    folder = case_folder(out, case)
    env = dict(os.environ, NGPU=str(case.gpus), LOG_RANK="0")
    start = time.perf_counter()
    try:
        done = subprocess.run(case.command(folder), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=case.timeout_s)
    except subprocess.TimeoutExpired:
        result.status, result.wall_s = f"FAIL: timed out after {case.timeout_s} s", case.timeout_s
        return result
    result.wall_s = time.perf_counter() - start
    with open(os.path.join(out, f"{case.name}.log"), "w") as fh:
        fh.write(done.stdout + done.stderr)
    if done.returncode != 0:
        last = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        result.status = f"FAIL: exit {done.returncode}: {last[-1][:160] if last else ''}"
        return result
    if case.module:  # generation: an answer was printed
        result.status = "pass" if done.stdout.strip() else "FAIL: no output"
        result.notes.append(done.stdout.strip().splitlines()[-1][:80] if done.stdout else "")
        return result
    return judge_training(result, folder)


def judge_training(result: Result, folder: str) -> Result:
    with open(os.path.join(folder, "metrics", "rank0.jsonl")) as fh:
        records = [r for r in map(json.loads, fh) if "loss" in r]
    last = records[-1] if records else {}
    if not records or not math.isfinite(last["loss"]):
        result.status = f"FAIL: last loss {last.get('loss')}"
        return result
    steady = records[1:] or records
    result.tokens_per_s = sum(r["tokens_per_s"] for r in steady) / len(steady)
    mfu = [r["mfu_pct"] for r in steady if r["mfu_pct"] is not None]
    result.mfu_pct = sum(mfu) / len(mfu) if mfu else None
    result.peak_gib = max(r["peak_memory_gib"] for r in records)
    result.status = f"pass (loss {records[0]['loss']:.3f} -> {last['loss']:.3f})"
    return result


def table(results: list[Result], device: str) -> str:
    def cell(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    lines = [f"GPU check on {device}", "",
             "| case | GPUs | result | tokens/s/GPU | MFU % | peak GiB | estimate GiB | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.case.name} | {r.case.gpus} | {r.status} | {cell(r.tokens_per_s, 0)}"
                     f" | {cell(r.mfu_pct)} | {cell(r.peak_gib, 2)} | "
                     f"{cell(r.estimate_gib, 2)} | {r.wall_s:.0f} |")
    lines += ["", *(f"- {r.case.name}: {r.case.what}" + (f" ({'; '.join(r.notes)})"
                                                       if r.notes else "") for r in results)]
    return "\n".join(lines)


def dry_run(cases: list[Case], out: str) -> None:
    """Print each case's command, after checking its job as the trainer would for that many
    ranks (all but what only a GPU can have): a renamed key or a refused combination fails
    here, in CI, instead of on the first GPU."""
    from titan_lite.build import check_job
    from titan_lite.config import ConfigError, load_config

    os.chdir(REPO)
    failed = False
    for case in cases:
        command = case.command(case_folder(out, case))
        job_argv = command[command.index("--config"):] if case.module else [*case.argv, *SHORT]
        try:
            problems = check_job(load_config(job_argv), case.gpus)
        except ConfigError as e:
            problems = e.problems
        problems = [p for p in problems if "needs a GPU" not in p]
        for problem in problems:
            print(f"# {case.name}: config error: {problem}")
        failed |= bool(problems)
        print(f"NGPU={case.gpus} {shlex.join(command)}")
    sys.exit(1 if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the commands (each config parsed) and run nothing")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES),
                        help=f"comma-separated, of: {', '.join(c.name for c in CASES)}")
    parser.add_argument("--out", default=os.path.join(REPO, "outputs", "gpu_check"),
                        help="run folders, each case's log, and the table (gpu_check.md)")
    parser.add_argument("--no-estimate", action="store_true", help="skip the estimator column")
    args = parser.parse_args()
    by_name = {c.name: c for c in CASES}
    unknown = [n for n in args.cases.split(",") if n not in by_name]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}")
    cases = [by_name[n] for n in args.cases.split(",")]
    if args.dry_run:
        dry_run(cases, args.out)

    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        sys.exit("gpu_check: no GPU visible (torch.cuda.device_count() is 0); --dry-run shows "
                 "the commands")
    device = f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    os.makedirs(args.out, exist_ok=True)
    estimates: dict[str, Future] = {}
    with ProcessPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // 4))) as pool:
        if not args.no_estimate:
            for case in cases:
                if not case.module:
                    estimates[case.name] = pool.submit(estimate, case.argv, case.gpus)
        results = []
        for case in cases:
            if case.gpus > gpus:
                results.append(Result(case, status=f"skipped: needs {case.gpus} GPUs"))
                continue
            results.append(run_case(case, args.out))
            print(f"{case.name}: {results[-1].status} ({results[-1].wall_s:.0f} s)",
                  file=sys.stderr, flush=True)
        for r in results:
            if r.case.name in estimates:
                try:
                    r.estimate_gib = estimates[r.case.name].result(timeout=300)
                except Exception as e:  # noqa: BLE001 - the table says why
                    r.notes.append(f"estimate failed: {type(e).__name__}: {str(e)[:80]}")
    report = table(results, device)
    print(report)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as fh:
        fh.write(report + "\n")
    sys.exit(0 if all(r.status.startswith(("pass", "skipped")) for r in results) else 1)


if __name__ == "__main__":
    main()
