"""Batch prediction: answers equal one prompt at a time, in the data's order; scores equal the
metric libraries' own; bad input refused in one line."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TIKTOKEN_PATH, python_env

from titan_lite.config import Generation
from titan_lite.data.chat import Llama3Template
from titan_lite.inference.generation import generate
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.predict import load_samples, predict, text_scores
from titan_lite.data.tokenizer import build_tokenizer


def test_scores_are_the_libraries_own():
    rouge_score = pytest.importorskip("rouge_score.rouge_scorer")
    sacrebleu = pytest.importorskip("sacrebleu")
    predictions = ["The cat sat on the mat.", "Yes.", "In the beginning God created",
                   "running dogs barked loudly"]
    references = ["The cat is on the mat.", "Yes.", "In the beginning God created the heaven",
                  "the dog runs and barks"]
    scores = text_scores(predictions, references)
    scorer = rouge_score.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, p)[name].fmeasure
                       for p, r in zip(predictions, references)) / 4
        assert scores[name] == pytest.approx(100 * expected)
    assert scores["bleu4"] == pytest.approx(sacrebleu.corpus_bleu(predictions,
                                                                  [references]).score)
    assert scores["exact_match"] == 25.0
    assert 0 < scores["rougeL"] < 100 and scores["rouge1"] > scores["rouge2"]


def test_predictions_equal_one_prompt_at_a_time_in_the_data_order(tmp_path):
    tok = build_tokenizer("tiktoken", TIKTOKEN_PATH)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=256))
    model.init_weights(seed=0)
    model.eval()
    records = [{"instruction": "Say it. " * (1 + 7 * (i % 4)), "input": "", "output": f"ok {i}"}
               for i in range(7)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = load_samples(str(tmp_path / "a.jsonl"), "alpaca")
    assert [s.reference for s in samples] == [f"ok {i}" for i in range(7)]
    template = Llama3Template(tok)
    sampling = Generation(max_new_tokens=6)
    cpu = torch.device("cpu")
    got = predict(model, samples, template, sampling, batch_size=3, device=cpu)
    alone = [generate(model, template.prompt(s.messages), sampling, set(template.stop_ids), cpu)
             for s in samples]
    assert [p.text for p in got] == [tok.decode(a.ids) for a in alone]
    assert [p.prompt_tokens for p in got] == [len(template.prompt(s.messages)) for s in samples]


def _tiny_model_and_samples(count: int):
    tok = build_tokenizer("tiktoken", TIKTOKEN_PATH)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.vocab_size, multiple_of=16, max_seq_len=256))
    model.init_weights(seed=0)
    samples = load_samples_from([{"instruction": "Say it. " * (1 + 5 * (i % 3)) + str(i),
                                  "output": "ok"} for i in range(count)])
    return model.eval(), samples, Llama3Template(tok)


def _predict_on_two_ranks(rank: int, world_size: int) -> None:
    model, samples, template = _tiny_model_and_samples(7)
    sampling, cpu = Generation(max_new_tokens=5), torch.device("cpu")
    lines: list[str] = []
    shared = predict(model, samples, template, sampling, 2, cpu, log=lines.append, rank=rank,
                     world_size=world_size)
    share = 4 if rank == 0 else 3  # (each rank answered only its own)
    assert f"{share}/{share} samples on rank {rank}" in lines[-1], lines
    assert shared == predict(model, samples, template, sampling, 2, cpu)


def test_two_ranks_share_the_samples_and_return_them_in_the_data_order():
    from dist_helpers import run_distributed

    run_distributed(_predict_on_two_ranks, 2)


def test_data_without_references_is_refused_in_one_line(tmp_path):
    (tmp_path / "q.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "titan_lite.predict", "--config", "train_configs/debug_sft.toml",
         "--data.format", "chat", "--data", str(tmp_path / "q.jsonl"), "--job.dump_folder",
         str(tmp_path)], cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'q.jsonl'}:1: no assistant message: nothing to learn from this "
        "record (predict.data needs a reference answer in every record)"]


def test_lora_adapters_off_answer_as_the_base_model_alone():
    """predict.compare 'base' on a LoRA job switches the adapters off instead of loading the
    base again: its answers equal the base model's, and the adapters do change them."""
    from titan_lite.config.schema import TARGETS
    from titan_lite.finetune.lora import LoRALinear, adapters_off, apply_lora

    tok = build_tokenizer("tiktoken", TIKTOKEN_PATH)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.vocab_size,
                     multiple_of=16, max_seq_len=128)
    torch.manual_seed(0)
    base = Transformer(args)
    base.init_weights(seed=0)
    base.eval()
    with torch.device("meta"):
        tuned = Transformer(args)
    apply_lora(tuned, rank=4, alpha=8.0, dropout=0.0, targets=list(TARGETS),
               base_dtype=torch.float32)
    tuned.to_empty(device="cpu")
    tuned.init_buffers()
    missing, _ = tuned.load_state_dict(base.state_dict(), strict=False)
    assert all("lora_" in name for name in missing)
    for module in tuned.modules():
        if isinstance(module, LoRALinear):
            torch.nn.init.normal_(module.lora_a.weight, std=0.5)
            torch.nn.init.normal_(module.lora_b.weight, std=0.5)
    tuned.eval()
    template, cpu = Llama3Template(tok), torch.device("cpu")
    samples = load_samples_from([{"instruction": f"Question {i}?" * (1 + i), "output": "a"}
                                 for i in range(4)])
    sampling = Generation(max_new_tokens=5)

    def texts(model):
        return [p.text for p in predict(model, samples, template, sampling, 2, cpu)]

    with adapters_off(tuned):
        assert texts(tuned) == texts(base)
    assert texts(tuned) != texts(base)  # (the scales are back)


def load_samples_from(records):
    from titan_lite.predict import Sample

    return [Sample(f"r:{i}", [{"role": "user", "content": r["instruction"]}], r["output"])
            for i, r in enumerate(records)]
