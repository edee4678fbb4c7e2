"""titan_lite vs torchtitan on this CPU, side by side: tokens/s per rank of the debug-model shape
(dim 256, 6 blocks, 16 heads, vocab 2256, batch 8 x 2048 per rank, float32, AdamW, no AC), in
1 process and on 2 gloo ranks with FSDP2, runs alternating so both see the same machine.

torchtitan goes in a venv of its own (nothing of it is committed here):

    python3 -m venv /tmp/tt-venv && /tmp/tt-venv/bin/pip install torch==2.13.0 torchtitan==0.2.2
    python bench/vs_torchtitan.py --torchtitan-python /tmp/tt-venv/bin/python

titan_lite runs as shipped (train_configs/debug_model.toml defaults, its metrics as logged).
torchtitan's Trainer needs a CUDA device module, its tokenizer files and datasets, so its side
is driven by the short loop in TORCHTITAN_STEP below: torchtitan's own Transformer,
init_weights, apply_fsdp (its FSDP2 wrapping and reshard policy), cross_entropy_loss and fused
AdamW, the trainer's clip and step, on random tokens; only the device plumbing is left out, and
two things are patched in memory for CPU: the MoE kernels' triton import, and its gradient
reduction (PREMUL_SUM, which gloo lacks) becomes FSDP's default average.

A third column runs torchtitan again with glibc's malloc set through the environment as
titan_lite sets it for itself on CPU (titan_lite/runtime/host_allocator.py): how much of the
ratio is that setting, which any PyTorch program could be given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, SEQ = 8, 2048

TORCHTITAN_STEP = r'''
import os, sys, time, types
import torch, torch.distributed as dist

# torchtitan's MoE kernels import triton, a GPU-only package; the dense Llama never calls them
sys.modules["torchtitan.models.moe.kernels"] = types.SimpleNamespace(
    generate_permute_indices=None)
import torchtitan.models.llama3.infra.parallelize as titan_parallelize
from torchtitan.components.loss import cross_entropy_loss
from torchtitan.models.llama3.model.args import TransformerModelArgs
from torchtitan.models.llama3.model.model import Transformer

steps, batch, seq = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")
torch.manual_seed(0)
args = TransformerModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2256,
                            rope_theta=500000, max_seq_len=seq)
with torch.device("meta"):
    model = Transformer(args)
if world > 1:
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    # Its sum-then-divide-by-tokens reduction is NCCL's PREMUL_SUM, which gloo lacks: keep
    # FSDP's average (the loss below is then a per-rank mean; the same work either way).
    titan_parallelize.disable_fsdp_gradient_division = lambda model: None
    titan_parallelize.apply_fsdp(model, mesh, torch.float32, torch.float32, pp_enabled=False)
model.to_empty(device="cpu")
with torch.no_grad():
    model.init_weights(buffer_device=torch.device("cpu"))
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=8e-4, betas=(0.9, 0.95), eps=1e-8,
                              weight_decay=0.1, fused=True)
tokens = torch.randint(0, 2256, (batch, seq + 1))
for step in range(1, steps + 1):
    start = time.perf_counter()
    pred = model(tokens[:, :-1])
    loss = cross_entropy_loss(pred, tokens[:, 1:]) / (batch * seq)
    del pred
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    optimizer.step()
    optimizer.zero_grad()
    loss_value = loss.item()
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"STEP {step} {batch * seq / (time.perf_counter() - start):.1f} {loss_value:.4f}",
              flush=True)
if world > 1:
    dist.destroy_process_group()
'''


def _torchrun(python: str, ranks: int, target: list[str]) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            *target]


def titan_lite_tokens_per_s(ranks: int, steps: int, folder: str) -> float:
    """Mean tokens/s per rank of steps 3.. as titan_lite logs them."""
    subprocess.run(_torchrun(sys.executable, ranks, [
        "-m", "titan_lite.train", "--training.steps", str(steps), "--job.dump_folder", folder,
        "--lr_scheduler.warmup_steps", "1"]), cwd=REPO, check=True, capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // ranks))})
    with open(os.path.join(folder, "metrics", "rank0.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    return statistics.mean(r["tokens_per_s"] for r in records if r.get("step", 0) >= 3
                           and "tokens_per_s" in r)


# titan_lite.runtime.host_allocator's mallopt settings, as glibc's environment variables
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**62)}


def torchtitan_tokens_per_s(python: str, ranks: int, steps: int, script: str,
                            keep_freed_memory: bool = False) -> float:
    """Mean tokens/s per rank of steps 3.. of the torchtitan loop."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // ranks)),
           **(KEEP_FREED_MEMORY if keep_freed_memory else {})}
    result = subprocess.run(_torchrun(python, ranks, [script, str(steps), str(BATCH), str(SEQ)]),
                            check=True, capture_output=True, text=True, env=env)
    rates = [float(line.split()[2]) for line in result.stdout.splitlines()
             if line.startswith("STEP") and int(line.split()[1]) >= 3]
    return statistics.mean(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torchtitan-python", required=True,
                        help="python of a venv with torch==2.13.0 and torchtitan installed")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--steps", type=int, default=6, help="per run; steps 3.. are measured")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "torchtitan_step.py")
        with open(script, "w") as fh:
            fh.write(TORCHTITAN_STEP)
        print("| ranks | titan_lite tok/s/rank (runs) | torchtitan tok/s/rank (runs) | ratio "
              "| torchtitan + titan_lite's malloc setting (runs) | ratio |")
        print("|---|---|---|---|---|---|")
        for ranks in map(int, args.ranks.split(",")):
            ours, theirs, theirs_kept = [], [], []
            for round_ in range(args.rounds):
                ours.append(titan_lite_tokens_per_s(ranks, args.steps,
                                                    os.path.join(tmp, f"tl-{ranks}-{round_}")))
                theirs.append(torchtitan_tokens_per_s(args.torchtitan_python, ranks,
                                                      args.steps, script))
                theirs_kept.append(torchtitan_tokens_per_s(args.torchtitan_python, ranks,
                                                           args.steps, script, True))
            print(f"| {ranks} | {_runs(ours)} | {_runs(theirs)} | "
                  f"{statistics.mean(ours) / statistics.mean(theirs):.2f}x | "
                  f"{_runs(theirs_kept)} | "
                  f"{statistics.mean(ours) / statistics.mean(theirs_kept):.2f}x |", flush=True)


def _runs(rates: list[float]) -> str:
    return f"{statistics.mean(rates):,.0f} ({', '.join(f'{x:,.0f}' for x in rates)})"


if __name__ == "__main__":
    main()
