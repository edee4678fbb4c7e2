"""What the document mask of packed instruction samples costs against plain causal attention.

    python bench/bench_document_mask.py [--rounds 3]

The same packed rows of the shipped instruction example (debug model, 8 x 2048, float32) go
through forward + backward twice per round, with their positions (attention kept inside each
sample: a boolean mask into SDPA's fused CPU kernel here, a FlexAttention block mask on CUDA)
and without (one causal sequence per row), in alternation. Prints the median seconds per step,
tokens/s and the peak bytes of live tensors of each. Not a test: the figures go to
docs/fine-tuning.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from titan_lite.config import load_config  # noqa: E402
from titan_lite.data import build_data  # noqa: E402
from titan_lite.loss import cross_entropy_sum  # noqa: E402
from titan_lite.runtime.memory import TensorMemoryTracker  # noqa: E402
from titan_lite.models.llama3 import FLAVORS, Transformer  # noqa: E402
from titan_lite.data.tokenizer import build_tokenizer  # noqa: E402


def step(model: Transformer, batch, masked: bool) -> tuple[float, int]:
    tracker = TensorMemoryTracker()
    tracker.track([*model.parameters(), *model.buffers()])
    start = time.perf_counter()
    with tracker:
        kwargs = batch.model_kwargs() if masked else {}
        cross_entropy_sum(model(batch.inputs, **kwargs), batch.labels).backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, tracker.peak_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.chdir(REPO)
    cfg = load_config(["--config", "train_configs/debug_sft.toml", "--training.seq_len", "2048",
                       "--validation.split", "0", "--validation.interval", "0"])
    tokenizer = build_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
    batch = build_data(cfg, tokenizer, 0, 0, 1, log=lambda m: None).train.next_batch()
    model = Transformer(replace(FLAVORS["debugmodel"], vocab_size=tokenizer.vocab_size,
                                max_seq_len=2048))
    model.init_weights(seed=0)
    step(model, batch, True), step(model, batch, False)  # warm-up
    runs: dict[bool, list[tuple[float, int]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for masked in (True, False):
            runs[masked].append(step(model, batch, masked))
    tokens = batch.inputs.numel()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch "
          f"{tuple(batch.inputs.shape)}, {int(batch.positions.eq(0).sum())} samples in the rows")
    print("| attention | s / forward+backward | tokens/s | peak tracked GiB |")
    print("|---|---|---|---|")
    for masked, label in ((False, "causal (rows as one sequence)"),
                          (True, "document mask (samples apart)")):
        seconds = statistics.median(s for s, _ in runs[masked])
        peak = max(p for _, p in runs[masked])
        print(f"| {label} | {seconds:.3f} | {tokens / seconds:,.0f} | {peak / 2**30:.3f} |")


if __name__ == "__main__":
    main()
