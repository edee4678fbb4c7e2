"""The tables of docs/will-it-fit.md and docs/lora.md: the planner's fastest fitting layout for
the 8B and 70B configs on common GPUs, 1, 2 and 8 of them. Runs on CPU (fake tensors), ~20
minutes here.

    python bench/fit_table.py [--configs train_configs/llama3_8b.toml] [--gpus "RTX 4090,H100"]
    python bench/fit_table.py --knobs     # what offload, bf16 and AC do to the 8B on 2 GPUs
    python bench/fit_table.py --methods   # 8B full / LoRA / QLoRA on one 8-80 GB card, and
                                          # what each memory knob adds (~15 minutes)
    python bench/fit_table.py --cards     # the planner's best full / LoRA / QLoRA layout for
                                          # the 8B and 70B on 1 x 8 GB, 1 x 24 GB, 2 x 24 GB
        [--card_models 8B --card_methods qlora --counts 1]   # some rows (a plan: minutes
                                                             # for the 8B, ~20 for the 70B)
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from titan_lite.config import load_config  # noqa: E402
from titan_lite.estimate import (  # noqa: E402
    ACTIVATIONS,
    BACKWARD,
    COMM,
    GATHERED,
    GIB,
    GPUS,
    GRADS,
    OPTIM,
    PARAMS,
    estimate_memory,
)
from titan_lite.estimate.planner import plan  # noqa: E402
from titan_lite.parallel.dims import resolve_degrees  # noqa: E402


def layout(cfg, count: int) -> str:
    t, ac = cfg.training, cfg.activation_checkpoint
    dims, _ = resolve_degrees(cfg.parallelism, count)
    if not dims.uses_fsdp(t.enable_cpu_offload):
        data = f"DDP {dims.dp_replicate}" if dims.dp_replicate > 1 else "1 rank"
    else:
        data = f"FSDP {dims.dp_shard}" + (f" x {dims.dp_replicate} replicas"
                                          if dims.dp_replicate > 1 else "")
    accumulation = ("" if t.global_batch_size == -1 else
                    f" x {t.global_batch_size // (t.local_batch_size * dims.dp)} accumulated")
    knobs = [name for name, on in (
        ("AdamW in backward (no clipping)", cfg.optimizer.in_backward),
        (f"{cfg.optimizer.state_dtype} moments", cfg.optimizer.state_dtype != "float32"),
        ("embedding on host", cfg.lora.embedding_on_host),
        ("activation offload", ac.offload)) if on]
    return (f"{data}, AC {ac.mode}, offload {'on' if t.enable_cpu_offload else 'off'}, "
            f"micro-batch {t.local_batch_size}{accumulation}"
            + "".join(f", {k}" for k in knobs))


KNOBS = {  # what each memory knob does to llama3 8B on 2 GPUs (1 x 8192 tokens per GPU)
    "fp32, no AC": ["--training.mixed_precision_param", "float32",
                    "--activation_checkpoint.mode", "none"],
    "bf16, no AC": ["--activation_checkpoint.mode", "none"],
    "bf16, selective (op) AC": [],
    "bf16, full AC": ["--activation_checkpoint.mode", "full"],
    "bf16, full AC, CPU offload": ["--activation_checkpoint.mode", "full",
                                   "--training.enable_cpu_offload", "true"],
    # the default slices the loss (loss_chunks 0 = 8 for this vocab); this row does not
    "bf16, full AC, CPU offload, loss in one piece": [
        "--activation_checkpoint.mode", "full", "--training.enable_cpu_offload", "true",
        "--training.loss_chunks", "1"],
}


def knobs_table(config: str) -> None:
    """Device and host memory of one rank for each memory knob, broken down."""
    print("| 8B on 2 GPUs | weights + grads + AdamW on GPU | gathered + comm | activations | "
          "backward temporaries | device peak | host (offload) |")
    print("|---|---|---|---|---|---|---|")
    for name, overrides in KNOBS.items():
        worst = estimate_memory(load_config(["--config", config, *overrides]), 2).worst
        d = {k: v / GIB for k, v in worst.device.items()}
        print(f"| {name} | {d.get(PARAMS, 0) + d.get(GRADS, 0) + d.get(OPTIM, 0):.1f} | "
              f"{d.get(GATHERED, 0) + d.get(COMM, 0):.1f} | {d.get(ACTIVATIONS, 0):.1f} | "
              f"{d.get(BACKWARD, 0):.1f} | {worst.device_peak / GIB:.1f} | "
              f"{worst.host_peak / GIB:.1f} |", flush=True)


CARDS_GB = (8, 12, 16, 24, 80)
CARD_USABLE = 0.983  # torch reports 23.6 GiB of a "24 GB" RTX 4090, 79.2 of an 80 GB H100
LORA = ["--lora.enable", "true"]
METHODS = {"full": [], "LoRA": LORA, "QLoRA": [*LORA, "--lora.quantize_base", "nf4"]}
ONE_GPU = ["--training.local_batch_size", "2", "--training.global_batch_size", "2"]
# The memory knobs in the order the knobs table adds them; the methods table has them all on.
MEMORY_KNOBS = {
    "loss in 8 slices": ["--training.loss_chunks", "8"],
    "embedding in host memory": ["--lora.embedding_on_host", "true"],
    "activation offload": ["--activation_checkpoint.offload", "true"],
}


def _knobs_for(method: str) -> list[str]:
    return [flag for name, flags in MEMORY_KNOBS.items() for flag in flags
            if method != "full" or name != "embedding in host memory"]  # a frozen table only


def methods_table(config: str) -> None:
    """One GPU, batch 2 x seq, bf16, full AC and every memory knob: each method with and
    without CPU offload; the traced device peak, what it needs with the allowances, host
    memory, and the verdict per card."""
    from titan_lite.build import check_job

    print("| method | seq | CPU offload | traced peak GiB | needs GiB | host GiB | "
          + " | ".join(f"{gb} GB" for gb in CARDS_GB) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(CARDS_GB))
    for method, flags in METHODS.items():
        for seq in (512, 2048):
            for offload in ("false", "true"):
                cfg = load_config(["--config", config, *flags, *_knobs_for(method), *ONE_GPU,
                                   "--training.seq_len", str(seq),
                                   "--training.enable_cpu_offload", offload])
                refused = check_job(cfg, 1, training_here=False)
                if refused:
                    print(f"| {method} | {seq} | {offload} | refused: {refused[0]} |", flush=True)
                    continue
                estimate = estimate_memory(cfg, 1)
                need = estimate.required_gib()
                verdicts = " | ".join("fits" if need <= gb * CARD_USABLE else "no"
                                      for gb in CARDS_GB)
                print(f"| {method} | {seq} | {offload} | {estimate.worst.device_peak / GIB:.2f} | "
                      f"{need:.2f} | {estimate.worst.host_peak / GIB:.1f} | {verdicts} |",
                      flush=True)


def method_knobs_table(config: str) -> None:
    """One GPU, batch 2 x 2048, bf16, full AC: the traced device peak of LoRA (base on the GPU
    and in host memory) and QLoRA as each memory knob is added to the previous ones."""
    on_gpu, on_host = ["--training.enable_cpu_offload", "false"], [
        "--training.enable_cpu_offload", "true"]
    jobs = {"LoRA": [*LORA, *on_gpu], "LoRA, base in host memory": [*LORA, *on_host],
            "QLoRA": [*METHODS["QLoRA"], *on_gpu]}
    print("| traced peak GiB (needs) | " + " | ".join(jobs) + " |")
    print("|---|" + "---|" * len(jobs))
    steps = [("no memory knob", ["--training.loss_chunks", "1"])]
    for name, flags in MEMORY_KNOBS.items():
        steps.append((f"+ {name}", [*steps[-1][1], *flags]))
    for name, flags in steps:
        cells = []
        for job in jobs.values():
            estimate = estimate_memory(load_config(["--config", config, *job, *ONE_GPU,
                                                    "--training.seq_len", "2048", *flags]), 1)
            cells.append(f"{estimate.worst.device_peak / GIB:.2f} "
                         f"({estimate.required_gib():.2f})")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


CARDS = (("RTX 3070", 1), ("RTX 4090", 1), ("RTX 4090", 2))  # 8 GB, 24 GB, 2 x 24 GB
DESKTOP_HOST_GIB = 56  # a 64 GB desktop's memory, room for the OS, shared by its ranks
CARD_JOBS = {  # batch 2 x 2048 (8B) and 1 x 2048 (70B) per GPU, no accumulation
    "llama3 8B": ["--config", "train_configs/llama3_8b_sft.toml",
                  "--training.local_batch_size", "2", "--training.global_batch_size", "-1"],
    "llama3 70B": ["--config", "train_configs/llama3_70b.toml", "--training.seq_len", "2048",
                   "--training.local_batch_size", "1", "--training.global_batch_size", "-1"],
}


def cards_table(models: list[str], methods: list[str], counts: list[int]) -> None:
    """Each method's fastest fitting layout (the planner, every memory knob searched) for the
    8B and 70B on an 8 GB card, a 24 GB card and two, in a 64 GB desktop."""
    print(f"| model | GPUs | method | best layout that fits (planner; host <= "
          f"{DESKTOP_HOST_GIB} GiB in all) | needs GiB/GPU | host GiB/rank | "
          "tokens/s/GPU (cost model) |")
    print("|---|---|---|---|---|---|---|")
    for name, flags in CARD_JOBS.items():
        if name.split()[-1] not in models:
            continue
        for gpu, count in CARDS:
            if count not in counts:
                continue
            for method in methods:
                cfg = load_config([*flags, "--estimate.plan_top", "1", "--estimate.plan_methods",
                                   method, "--estimate.host_memory_gb",
                                   str(DESKTOP_HOST_GIB / count)])
                best = plan(cfg, count, GPUS[gpu].memory_gib, gpu,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
                row = f"| {name} | {count} x {gpu} | {method} |"
                if not best:
                    print(f"{row} does not fit | | | |", flush=True)
                    continue
                c, t = best[0], best[0].cfg.training
                samples = t.local_batch_size if t.global_batch_size == -1 else (
                    t.global_batch_size // count)  # per rank and step
                tokens = t.seq_len * samples
                print(f"{row} {layout(c.cfg, count)} | {c.estimate.required_gib():.1f} | "
                      f"{c.estimate.worst.host_peak / GIB:.1f} | "
                      f"{tokens / c.step_seconds:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knobs", action="store_true",
                        help="instead: what each memory knob does to the 8B on 2 GPUs")
    parser.add_argument("--methods", action="store_true",
                        help="instead: the 8B with full / LoRA / QLoRA on one 8-80 GB card, "
                             "and what each memory knob adds to LoRA and QLoRA")
    parser.add_argument("--configs", default="train_configs/llama3_8b.toml,"
                                              "train_configs/llama3_70b.toml")
    parser.add_argument("--gpus", default="RTX 4090,A100-40GB,H100")
    parser.add_argument("--counts", default="1,2,8", help="GPU counts (also for --cards)")
    parser.add_argument("--cards", action="store_true",
                        help="instead: the best full / LoRA / QLoRA layout for the 8B and 70B "
                             "on 1 x 8 GB, 1 x 24 GB and 2 x 24 GB cards")
    parser.add_argument("--card_models", default="8B,70B", help="--cards: these rows only")
    parser.add_argument("--card_methods", default="full,lora,qlora",
                        help="--cards: these methods only")
    args = parser.parse_args()
    os.chdir(REPO)
    if args.cards:
        cards_table(args.card_models.split(","), args.card_methods.split(","),
                    [int(n) for n in args.counts.split(",")])
        return
    if args.knobs:
        knobs_table("train_configs/llama3_8b.toml")
        return
    if args.methods:
        methods_table("train_configs/llama3_8b_sft.toml")
        print()
        method_knobs_table("train_configs/llama3_8b_sft.toml")
        return
    print("| model | GPUs | best layout that fits (planner) | needs GiB/GPU | host GiB/rank | "
          "tokens/s/GPU (cost model) |")
    print("|---|---|---|---|---|---|")
    for config in args.configs.split(","):
        for gpu in args.gpus.split(","):
            for count in map(int, args.counts.split(",")):
                cfg = load_config(["--config", config, "--estimate.plan_top", "1"])
                best = plan(cfg, count, GPUS[gpu].memory_gib, gpu)
                name = f"llama3 {cfg.model.flavor}"
                if not best:
                    print(f"| {name} | {count} x {gpu} | does not fit | | | |", flush=True)
                    continue
                c = best[0]
                tokens = cfg.training.seq_len * cfg.training.local_batch_size * count
                print(f"| {name} | {count} x {gpu} | {layout(c.cfg, count)} | "
                      f"{c.estimate.required_gib():.1f} | {c.estimate.worst.host_peak / GIB:.0f} | "
                      f"{tokens / c.step_seconds / count:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
