"""Fine-tuning on instruction data: the loss is the mean over the global batch's target tokens
in every layout; validation agrees across layouts and leaves training (and resume) exact."""

import contextlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CPU_ENV, REPO, python_env
from layouts import assert_matches, run_layout

from titan_lite.checkpoint import complete_steps
from titan_lite.config import load_config
from titan_lite.data import build_data
from titan_lite.loss import IGNORE_INDEX, cross_entropy_sum
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.data.tokenizer import build_tokenizer
from titan_lite.train import StepRecipe, forward_backward, train

pytestmark = pytest.mark.slow


def records() -> list[dict]:
    """Answers of 1 word and of ~45 words: rows hold very different numbers of targets."""
    out = []
    for i in range(48):
        answer = "Amen." if i % 3 else " ".join(["and it was so"] * (9 + i % 4))
        out.append({"instruction": f"Say something about day {i}.", "output": answer})
    return out


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return str(path)


def sft(path: str, *extra: str) -> list[str]:
    return ["--data.format", "alpaca", "--data.paths", path, "--data.shuffle", "false",
            "--validation.split", "0.2", "--validation.interval", "1", *extra]


@pytest.fixture(scope="module")
def sft_reference(tmp_path_factory, sft_file):
    return run_layout(tmp_path_factory.mktemp("sft_ref"), "one", 1,
                      *sft(sft_file, "--training.local_batch_size", "4"))


def test_rows_hold_very_unequal_target_counts(repo_cwd, sft_file, tmp_path):
    """What makes the normalisation tests below meaningful: a mean of per-row (or per-rank)
    means would weigh these rows very differently from a mean over tokens."""
    cfg = load_config(sft(sft_file, "--training.seq_len", "64", "--training.local_batch_size",
                          "4"))
    data = build_data(cfg, build_tokenizer("tiktoken", cfg.tokenizer.path), 0, 0, 1,
                      log=lambda m: None)
    counts = (data.train.next_batch().labels != IGNORE_INDEX).sum(dim=1)
    assert counts.max() >= 4 * counts.min(), counts


@pytest.mark.parametrize("name, world, overrides", [
    # (the reference computes its loss in one piece; some layouts in 4 token slices)
    ("fsdp2-accum2-losschunks4", 2, ["--training.local_batch_size", "1",
                                     "--training.global_batch_size", "4",
                                     "--training.loss_chunks", "4"]),
    ("ddp2", 2, ["--parallelism.dp_shard", "1", "--parallelism.dp_replicate", "2",
                 "--training.local_batch_size", "2"]),
    ("tp2-losschunks4", 2, ["--parallelism.tensor_parallel_degree", "2",
                            "--training.local_batch_size", "4", "--training.loss_chunks", "4"]),
    ("pp2-losschunks4", 2, ["--parallelism.pipeline_parallel_degree", "2",
                            "--training.local_batch_size", "4", "--training.loss_chunks", "4"]),
])
def test_layouts_match_one_process_on_masked_data_with_validation(tmp_path, sft_file,
                                                                   sft_reference, name, world,
                                                                   overrides):
    result = run_layout(tmp_path, name, world, *sft(sft_file, *overrides))
    assert_matches(result, sft_reference)
    assert result["validation"].keys() == sft_reference["validation"].keys() == {0, 1, 2, 3}
    torch.testing.assert_close(result["validation"], sft_reference["validation"], rtol=0,
                               atol=2e-5)
    # validation falls as training goes on, and training is not touched by it (above)
    assert sft_reference["validation"][3] < sft_reference["validation"][0]


def test_loss_is_the_mean_over_target_tokens_of_the_whole_batch(repo_cwd, sft_file):
    cfg = load_config(sft(sft_file, "--training.seq_len", "64"))
    data = build_data(cfg, build_tokenizer("tiktoken", cfg.tokenizer.path), 0, 0, 1,
                      log=lambda m: None)
    batches = [data.train.next_batch() for _ in range(2)]
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=2256,
                                  multiple_of=16, max_seq_len=64))
    recipe = StepRecipe(accumulation=2, autocast=torch.autocast("cpu", enabled=False),
                        loss_context=contextlib.nullcontext,
                        reduce_every_micro=True, grad_scale=1, label_copies=1)
    queue = iter(batches)
    loss = forward_backward(model, lambda: next(queue), torch.device("cpu"), recipe)
    # by hand: -log p(target) over every unmasked label of both micro-batches
    logp, targets = [], 0
    with torch.no_grad():
        for b in batches:
            logits = model(b.inputs, positions=b.positions).log_softmax(-1)
            keep = b.labels != IGNORE_INDEX
            logp.append(logits[keep].gather(-1, b.labels[keep][:, None]).sum())
            targets += int(keep.sum())
    torch.testing.assert_close(loss, -sum(logp) / targets, rtol=1e-6, atol=0)
    with torch.no_grad():
        mean_of_means = sum(cross_entropy_sum(model(b.inputs, positions=b.positions), b.labels)
                            / (b.labels != IGNORE_INDEX).sum() for b in batches) / 2
    assert abs(float(mean_of_means) - float(loss)) > 1e-3  # what the old loss would have been


def test_resume_is_exact_with_validation_on(repo_cwd, sft_file, tmp_path):
    args = [*sft(sft_file), "--training.seq_len", "64", "--training.steps", "4",
            "--training.local_batch_size", "2", "--metrics.cpu_peak_tflops", "1",
            "--checkpoint.enable", "true", "--checkpoint.interval", "2",
            "--checkpoint.keep_latest_k", "0"]
    straight = train(load_config([*args, "--job.dump_folder", str(tmp_path / "a")]), CPU_ENV)
    assert complete_steps(str(tmp_path / "a" / "checkpoint")) == [2, 4]
    os.makedirs(tmp_path / "b" / "checkpoint")
    shutil.copytree(tmp_path / "a" / "checkpoint" / "step-2",
                    tmp_path / "b" / "checkpoint" / "step-2")
    resumed = train(load_config([*args, "--job.dump_folder", str(tmp_path / "b")]), CPU_ENV)
    assert resumed.losses == straight.losses[2:]  # bitwise
    assert {s: straight.validation_losses[s] for s in (3, 4)} == resumed.validation_losses
    records = [json.loads(line) for line in open(tmp_path / "a" / "metrics" / "rank0.jsonl")]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 1, 2, 3, 4]
    assert all(r["val_perplexity"] == pytest.approx(np.exp(r["val_loss"]))
               for r in records if "val_loss" in r)


# (each message itself, and the others, are tested in process: test_instruct_data.py)
@pytest.mark.parametrize("content, message", [
    ('{"instruction": "' + "long " * 300 + '", "output": "a"}\n',
     "data.paths ({folder}/sft.jsonl): none of the 1 samples fits training.seq_len 256"),
])
def test_bad_data_through_run_train_exits_2_on_every_rank_with_one_line(tmp_path, content,
                                                                        message):
    (tmp_path / "sft.jsonl").write_text(content)
    result = subprocess.run(
        ["./run_train.sh", "--config", "train_configs/debug_sft.toml", "--data.paths",
         str(tmp_path / "sft.jsonl"), "--job.dump_folder", str(tmp_path / "out"),
         "--validation.split", "0", "--validation.interval", "0"],
        cwd=REPO, env=python_env(NGPU="2", LOG_RANK="0,1"), capture_output=True, text=True,
        timeout=180)
    output = result.stdout + result.stderr
    message = message.format(folder=tmp_path)
    assert result.returncode == 2, output[-3000:]
    for rank in (0, 1):
        assert f"[rank{rank}] error: " in output and message in output, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # no half-written cache


@pytest.mark.timeout(600)  # as its training subprocess: ~150 s, but this machine varies 2x
def test_shipped_example_learns_and_answers_from_its_checkpoint(tmp_path):
    """train_configs/debug_sft.toml, shortened to 50 steps (the full 400 take ~4 minutes):
    validation loss falls, the held-out yes/no questions get right answers (the first-word
    question needs ~150 steps: docs/fine-tuning.md's full run), and generate answers from the saved
    checkpoint."""
    out = str(tmp_path / "run")
    steps = ["--training.steps", "50", "--validation.interval", "25", "--checkpoint.interval",
             "50", "--job.dump_folder", out]
    result = subprocess.run(["./run_train.sh", "--config", "train_configs/debug_sft.toml",
                             *steps], cwd=REPO, env={**python_env(), "OMP_NUM_THREADS": "2"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(out, "metrics", "rank0.jsonl"))]
    val = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert list(val) == [0, 25, 50] and val[50] < 0.1 * val[0], val
    answers = [line.rsplit(" -> ", 1)[1] for line in result.stdout.splitlines()
               if "sample after step 50" in line]
    assert answers[:2] == ["'Yes.'", "'No.'"], result.stdout[-3000:]
    assert complete_steps(os.path.join(out, "checkpoint")) == [50]
    asked = subprocess.run(
        [sys.executable, "-m", "titan_lite.generate", "--config", "train_configs/debug_sft.toml",
         "--job.dump_folder", out, "--chat", "--prompt",
         "Does this verse speak of God?\n\nIn the beginning God created the heaven and the earth."],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert asked.returncode == 0, asked.stderr[-3000:]
    assert asked.stdout.strip() == "Yes." and "tokens/s" in asked.stderr
    # predict: the 150 held-out records (validation.split's), answered in batches, scored
    held = os.path.join(REPO, "titan_lite/assets/data/kjv_sft_held_out.jsonl")  # (tested)
    scored = subprocess.run(
        [sys.executable, "-m", "titan_lite.predict", "--config", "train_configs/debug_sft.toml",
         "--job.dump_folder", out, "--data", held, "--batch_size", "16",
         "--compare", "step-50"],  # (the same weights: a second model, no change)
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    lines = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    assert [line["source"] for line in lines] == [f"{held}:{n}" for n in range(1, 151)]
    assert all(line["prediction_before"] == line["prediction"] for line in lines)
    before, after, change = (line.split()[1:] for line in scored.stdout.splitlines()[-3:])
    assert before == after and change == [f"{value}" if i % 2 == 0 else "+0.00"
                                          for i, value in enumerate(after)]
    scores = dict(zip(after[::2], map(float, after[1::2])))
    assert scores["exact_match"] > 50, scored.stdout  # the yes/no questions
    written = json.load(open(os.path.join(out, "predictions.scores.json")))["after"]
    assert {name: round(value, 2) for name, value in written.items()} == scores
    print(scored.stdout)
    # the same on two ranks (each answers half): the same file, in the data's order
    shared = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "-m", "titan_lite.predict", "--config",
         "train_configs/debug_sft.toml", "--job.dump_folder", out, "--data", held,
         "--batch_size", "16", "--output", str(tmp_path / "2.jsonl")],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=300)
    assert shared.returncode == 0, shared.stderr[-3000:]
    two = [json.loads(line) for line in open(tmp_path / "2.jsonl")]
    assert two == [{k: v for k, v in line.items() if k != "prediction_before"} for line in lines]
    # lm-evaluation-harness: the held-out yes/no questions as a local multiple-choice task,
    # asked in the job's chat template
    harness = subprocess.run(
        [sys.executable, "-m", "titan_lite.evaluate", "--config", "train_configs/debug_sft.toml",
         "--job.dump_folder", out, "--include_path", "titan_lite/assets/eval_tasks", "--tasks",
         "kjv_yes_no", "--chat_template", "true"], cwd=REPO,
        env=python_env(HF_DATASETS_OFFLINE="1"), capture_output=True, text=True, timeout=300)
    assert harness.returncode == 0, harness.stderr[-3000:]
    accuracy = json.load(open(os.path.join(out, "eval_results.json")))["results"]["kjv_yes_no"]
    assert accuracy["acc,none"] > 0.8, harness.stdout  # (0.88 after 50 steps; chance is 0.5)
    print(harness.stdout)



def test_generate_refuses_a_missing_checkpoint_with_one_line(tmp_path):
    asked = subprocess.run(
        [sys.executable, "-m", "titan_lite.generate", "--config", "train_configs/debug_sft.toml",
         "--job.dump_folder", str(tmp_path), "--prompt", "hi"],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert asked.returncode == 2
    assert "error: generation.checkpoint: no checkpoint in" in asked.stderr
    assert "Traceback" not in asked.stderr
