"""The host optimizer: step speed by state dtype, the memory the two knobs save, and what the
compact states cost in final loss. Prints Markdown tables. Not a test.

    python bench/bench_optimizer.py speed [--billion 0.1] [--steps 3]
    python bench/bench_optimizer.py peak [--flavor small] [--seq 512]
    python bench/bench_optimizer.py loss [--steps 100]

speed: one AdamW step over ``--billion`` billion float32 parameters (4096 x 4096 tensors with
random gradients) on all of this machine's cores, per implementation, side by side: torch's
fused AdamW, titan_lite's SlicedAdamW with float32 / bfloat16 / int8 moments, and where they
import here torchao's and bitsandbytes' 8-bit AdamW and DeepSpeed's CPUAdam (a library's first
step, which compiles or builds, is not timed).
peak: the tracked tensor peak of ``--flavor`` training 2 steps in one process with CPU
offload (every tensor in host memory) and full activation checkpointing (without it the
activations at the start of backward, when no gradient exists yet, set the peak), with and
without optimizer.in_backward and int8 states.
loss: the debug SFT example (train_configs/debug_sft.toml) for ``--steps`` steps with each
state dtype; its validation loss at the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from titan_lite.runtime.memory import tensor_bytes  # noqa: E402
from titan_lite.optim.compact import (  # noqa: E402
    STATE_DTYPES,
    SlicedAdamW,
    state_bytes_per_parameter,
)

OPTIONS = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def _libraries() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """The other implementations that import on this machine."""
    found = {}
    try:
        from torchao.optim import AdamW8bit
        found["torchao AdamW8bit (int8)"] = lambda p: AdamW8bit(p, **OPTIONS)
    except ImportError:
        print("torchao: not installed (pip install 'torchao>=0.18,<0.19')")
    try:
        import bitsandbytes as bnb
        found["bitsandbytes AdamW8bit (int8)"] = lambda p: bnb.optim.AdamW8bit(p, **OPTIONS)
    except ImportError:
        print("bitsandbytes: not installed (pip install 'bitsandbytes>=0.50')")
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        found["DeepSpeed CPUAdam (float32)"] = lambda p: DeepSpeedCPUAdam(p, **OPTIONS)
    except ImportError:
        print("DeepSpeed: not installed (pip install deepspeed; CPUAdam builds on first use)")
    return found


def speed(billion: float, steps: int) -> None:
    count = max(1, round(billion * 1e9 / 4096**2))
    numel = count * 4096**2
    candidates: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "torch AdamW fused (float32)": lambda p: torch.optim.AdamW(p, fused=True, **OPTIONS)}
    for name in STATE_DTYPES:
        candidates[f"titan_lite SlicedAdamW ({name})"] = (
            lambda p, n=name: SlicedAdamW(p, STATE_DTYPES[n], **OPTIONS))
    candidates.update(_libraries())
    print(f"\n{numel / 1e9:.3f} B float32 parameters ({count} x 4096 x 4096), "
          f"{torch.get_num_threads()} threads, {steps} timed steps after one untimed\n")
    print("| implementation | s per step | s per billion parameters | moments, bytes/param |")
    print("|---|---|---|---|")
    for name, make in candidates.items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4096, 4096)) for _ in range(count)]
        for p in params:
            p.grad = torch.randn_like(p)
        try:
            optimizer = make(params)
            optimizer.step()  # states made; a library's compile or build
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            seconds = (time.perf_counter() - start) / steps
        except Exception as e:  # noqa: BLE001 - a library that fails here is a finding
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:80]} | | |")
            continue
        states = [v for p in params for v in optimizer.state[p].values()
                  if isinstance(v, torch.Tensor) and v.numel() > 1]
        per_param = sum(tensor_bytes(v) for v in states) / numel
        print(f"| {name} | {seconds:.3f} | {seconds * 1e9 / numel:.2f} | {per_param:.2f} |")
        del optimizer, params, states
    expected = ', '.join(f'{k} {state_bytes_per_parameter(k):.2f}' for k in STATE_DTYPES)
    print(f"\n(expected moments, bytes per parameter: {expected})")


def _train(args: list[str], folder: str) -> list[dict]:
    """Train the job (one process under torchrun) and return its JSONL records."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=1", "-m", "titan_lite.train", *args,
               "--job.dump_folder", folder, "--metrics.enable_jsonl", "true"]
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(folder, "metrics", "rank0.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def peak(flavor: str, seq: int) -> None:
    base = ["--config", "train_configs/debug_model.toml", "--model.flavor", flavor,
            "--training.seq_len", str(seq), "--training.local_batch_size", "2",
            "--training.steps", "2", "--metrics.log_freq", "1",
            "--activation_checkpoint.mode", "full",  # else the activations set the peak
            "--training.enable_cpu_offload", "true", "--training.max_norm", "0"]
    variants = {"AdamW, float32 moments": [],
                "+ optimizer.in_backward": ["--optimizer.in_backward", "true"],
                "+ optimizer.state_dtype int8": ["--optimizer.state_dtype", "int8"],
                "+ both": ["--optimizer.in_backward", "true",
                           "--optimizer.state_dtype", "int8"]}
    print(f"\n{flavor}, 2 x {seq} tokens, full AC, CPU offload, 1 process: tracked tensor "
          "peak\n")
    print("| optimizer | peak GiB | vs AdamW | tokens/s (step 2) | loss step 2 |")
    print("|---|---|---|---|---|")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(variants.items()):
            last = _train([*base, *extra], os.path.join(tmp, str(i)))[-1]
            first = first or last["peak_memory_gib"]
            print(f"| {name} | {last['peak_memory_gib']:.3f} | "
                  f"{last['peak_memory_gib'] / first - 1:+.0%} | {last['tokens_per_s']:.0f} | "
                  f"{last['loss']:.4f} |")


def loss(steps: int) -> None:
    print(f"\ntrain_configs/debug_sft.toml, {steps} steps: validation loss at step {steps}\n")
    print("| state dtype | validation loss | vs float32 | train loss |")
    print("|---|---|---|---|")
    reference = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in STATE_DTYPES:
            records = _train(["--config", "train_configs/debug_sft.toml", "--training.steps",
                              str(steps), "--validation.interval", str(steps),
                              "--checkpoint.enable", "false", "--optimizer.state_dtype", name],
                             os.path.join(tmp, name))
            validation = [r for r in records if "val_loss" in r][-1]["val_loss"]
            reference = reference or validation
            train_loss = [r for r in records if "loss" in r][-1]["loss"]
            print(f"| {name} | {validation:.4f} | {validation / reference - 1:+.2%} | "
                  f"{train_loss:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["speed", "peak", "loss"])
    parser.add_argument("--billion", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    if args.part == "speed":
        speed(args.billion, args.steps or 3)
    elif args.part == "peak":
        peak(args.flavor, args.seq)
    else:
        loss(args.steps or 100)


if __name__ == "__main__":
    main()
