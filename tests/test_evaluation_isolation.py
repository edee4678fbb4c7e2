"""Validation and sample answers leave training alone: eval mode (dropout off) and the RNG
restored, so a LoRA run with dropout trains the same whatever validation.interval is."""

import contextlib

import torch
import torch.nn.functional as F
from conftest import CPU_ENV

from titan_lite.config import load_config
from titan_lite.data import Batch
from titan_lite.finetune.lora import apply_lora
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.parallel.init import materialize
from titan_lite.train import train
from titan_lite.validate import Evaluation, Validator, evaluating

CPU = torch.device("cpu")
ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                 max_seq_len=32)


def lora_model_with_dropout() -> Transformer:
    with torch.device("meta"):
        model = Transformer(ARGS)
    apply_lora(model, rank=4, alpha=8, dropout=0.5, targets=["wq", "wv", "w1", "w2"],
               base_dtype=torch.float32)
    materialize(model, seed=0, compute_device=CPU, param_device=CPU)
    for name, p in model.named_parameters():  # B starts at zero: make the adapters matter
        if ".lora_" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


class _Metrics:
    def log_validation(self, step, loss, perplexity, targets, seconds):
        pass


def test_validation_runs_in_eval_mode_and_restores_rng_and_mode():
    torch.manual_seed(0)
    model = lora_model_with_dropout().train()
    tokens = torch.randint(0, ARGS.vocab_size, (3, 17))
    batch = Batch(tokens[:, :-1], tokens[:, 1:])
    validator = Validator([batch], model, CPU, torch.autocast("cpu", enabled=False),
                          contextlib.nullcontext, 1, 1, 1)
    evaluation = Evaluation(load_config([]), validator, [model], None, None, CPU, print)
    rng = torch.get_rng_state()
    evaluation.run(5, _Metrics())
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream is untouched
    assert model.training
    with torch.no_grad():
        model.eval()
        expected = F.cross_entropy(model(batch.inputs).flatten(0, 1), batch.labels.flatten())
        model.train()
        with_dropout = F.cross_entropy(model(batch.inputs).flatten(0, 1), batch.labels.flatten())
    assert abs(with_dropout.item() - expected.item()) > 1e-3  # dropout would show
    assert abs(evaluation.losses[5] - expected.item()) < 1e-5


def test_evaluating_restores_eval_mode_of_modules_that_were_in_it():
    model = lora_model_with_dropout().eval()
    with evaluating([model], CPU):
        pass
    assert not model.training


def test_validation_interval_does_not_change_training_with_dropout(repo_cwd, tmp_path):
    def losses(interval: str) -> list[float]:
        cfg = load_config([
            "--training.seq_len", "64", "--training.local_batch_size", "2",
            "--training.steps", "4", "--metrics.log_freq", "100",
            "--metrics.cpu_peak_tflops", "1", "--lr_scheduler.warmup_steps", "1",
            "--lora.enable", "true", "--lora.rank", "4", "--lora.dropout", "0.3",
            "--validation.split", "0.1", "--validation.steps", "1",
            "--validation.interval", interval, "--job.dump_folder", str(tmp_path / interval)])
        return train(cfg, CPU_ENV).losses

    assert losses("2") == losses("0")  # bitwise: fp32, one process

