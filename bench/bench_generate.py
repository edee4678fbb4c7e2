"""Batched generation: titan_lite's ``generate_batch`` vs ``transformers``' ``generate``.

    python bench/bench_generate.py [--flavor small] [--prompts 32] [--new 32] [--device cpu]

One random Llama of ``--flavor`` is saved as a Hugging Face folder and loaded by both (float32
on CPU, bfloat16 on CUDA). ``--prompts`` prompts of 8 to 128 tokens (the shipped KJV sample,
shipped test tokenizer) are answered greedily, ``--new`` new tokens each (no stop token, so
both produce the same number), in batches of 1, 8 and 32, side by side in one run: new tokens
per second over all prompts, and how many answers are token for token equal to transformers'
(left padding with an attention mask there). Then the memory a Llama 3 8B needs to answer
(weights in bf16 and with QLoRA's NF4 base, KV cache per 2,048 positions), from the
estimator's parameter counts. Prints Markdown tables. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from titan_lite.config import Generation, load_config  # noqa: E402
from titan_lite.estimate.cost import model_stats  # noqa: E402
from titan_lite.inference.model import load_model  # noqa: E402
from titan_lite.inference.generation import generate_batch  # noqa: E402
from titan_lite.hf import save_hf  # noqa: E402
from titan_lite.models.llama3 import FLAVORS, Transformer  # noqa: E402
from titan_lite.data.tokenizer import build_tokenizer  # noqa: E402

CORPUS = os.path.join(REPO, "titan_lite/assets/data/kjv_sample.jsonl")
TOKENIZER = os.path.join(REPO, "titan_lite/assets/tokenizers/test_tiktoken.model")
BATCHES = (1, 8, 32)


def prompts(count: int) -> list[list[int]]:
    """``count`` prompts of 8 to 128 tokens cut from the shipped corpus."""
    tok = build_tokenizer("tiktoken", TOKENIZER)
    ids = tok.encode(" ".join(json.loads(line)["text"] for line in open(CORPUS)), bos=False)
    lengths = [8 + (120 * i) // max(count - 1, 1) for i in range(count)]
    return [[tok.bos_id] + ids[1000 * i:1000 * i + n - 1] for i, n in enumerate(lengths)]


def ours(model: Transformer, batch: list[list[int]], new: int, device: torch.device
         ) -> list[list[int]]:
    out = generate_batch(model, batch, Generation(max_new_tokens=new), set(), device)
    return [answer.ids for answer in out]


def theirs(model, batch: list[list[int]], new: int, device: torch.device) -> list[list[int]]:
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                         max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                         eos_token_id=None)
    return out[:, width:].tolist()


def timed(answer, model, all_prompts: list[list[int]], batch_size: int, new: int,
          device: torch.device) -> tuple[float, list[list[int]]]:
    """(seconds, answers) for every prompt, ``batch_size`` at a time."""
    answers: list[list[int]] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(all_prompts), batch_size):
            answers += answer(model, all_prompts[first:first + batch_size], new, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, answers


def speed_table(flavor: str, count: int, new: int, device: torch.device) -> None:
    import transformers

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = FLAVORS[flavor]
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        source = Transformer(args)
        source.init_weights(seed=0)
        save_hf(source.state_dict(), args, folder)
        del source
        job = load_config(["--model.flavor", flavor, "--model.init_from", folder,
                           "--tokenizer.path", TOKENIZER, "--training.mixed_precision_param",
                           str(dtype).removeprefix("torch.")])
        model = load_model(job, build_tokenizer("tiktoken", TOKENIZER), device)  # (generate's)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
        hf.eval()
    all_prompts = prompts(count)
    ours(model, all_prompts[:2], 2, device), theirs(hf, all_prompts[:2], 2, device)  # warm-up
    print(f"\n{flavor} ({model.num_params() / 1e6:.0f}M parameters, {dtype}), {count} prompts "
          f"of 8-128 tokens, {new} new tokens each, greedy, on {describe(device)}, "
          f"{torch.get_num_threads()} threads\n")
    print("| batch | titan_lite new tokens/s | transformers new tokens/s | ratio | "
          "answers equal |")
    print("|---|---|---|---|---|")
    for batch_size in BATCHES:
        mine_s, mine = timed(ours, model, all_prompts, batch_size, new, device)
        their_s, reference = timed(theirs, hf, all_prompts, batch_size, new, device)
        total = count * new
        equal = sum(a == b for a, b in zip(mine, reference))
        print(f"| {batch_size} | {total / mine_s:,.0f} | {total / their_s:,.0f} | "
              f"{their_s / mine_s:.2f}x | {equal}/{count} |", flush=True)


def memory_table() -> None:
    """What answering with Llama 3 8B holds: weights (bf16, or QLoRA's NF4 base with bf16
    embedding/norms/output and rank-8 adapters) and the KV cache per 2,048 positions."""
    try:
        import llama_models  # (Meta's 128k tokenizer.model: the 8B's embedding and output)
    except ImportError:
        print("\n(the 8B memory table needs Meta's tokenizer: pip install llama-models)")
        return
    tokenizer = os.path.join(os.path.dirname(llama_models.__file__), "llama3", "tokenizer.model")
    base = ["--model.flavor", "8B", "--tokenizer.path", tokenizer, "--training.seq_len", "2048"]
    bf16 = model_stats(load_config(base)).params * 2
    nf4 = model_stats(load_config(base + ["--lora.enable", "true", "--lora.quantize_base",
                                          "nf4", "--lora.base_dtype", "bfloat16"])
                      ).weight_bytes
    args = FLAVORS["8B"]
    kv = 2 * args.n_layers * args.kv_heads * args.head_dim * 2 * 2048
    print("\nLlama 3 8B (128,256-token vocabulary), answering:\n")
    print("| weights | weight GiB | KV cache GiB per 2,048 positions (bf16) |")
    print("|---|---|---|")
    print(f"| bf16 | {bf16 / 2**30:.2f} | {kv / 2**30:.2f} |")
    print(f"| NF4 base (QLoRA) | {nf4 / 2**30:.2f} | {kv / 2**30:.2f} |")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small", choices=sorted(FLAVORS))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    speed_table(args.flavor, args.prompts, args.new, torch.device(args.device))
    memory_table()


if __name__ == "__main__":
    main()
