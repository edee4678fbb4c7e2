"""training.compile: compiled blocks and loss reproduce eager training (fp32, CPU Inductor)."""

import os

import pytest
import torch
from conftest import CPU_ENV
from layouts import LOSS_ATOL, run_layout

from titan_lite.config import check_job, load_config
from titan_lite.train import train

# Inductor fuses and reorders float32 arithmetic: rounding-level differences, which AdamW's
# division by the gradients' RMS makes visible in the weights after a few steps.
COMPILED_PARAM_ATOL = 1e-4


@pytest.mark.slow
def test_compiled_training_matches_eager(repo_cwd, tmp_path, monkeypatch, capsys):
    """One process, op-level selective AC, the loss in 2 slices, masked instruction data."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    base = ["--training.seq_len", "64", "--training.local_batch_size", "2", "--training.steps",
            "3", "--metrics.cpu_peak_tflops", "1", "--activation_checkpoint.mode", "selective",
            "--training.loss_chunks", "2", "--data.format", "alpaca", "--data.paths",
            "titan_lite/assets/data/kjv_sft.jsonl"]
    eager = train(load_config([*base, "--job.dump_folder", str(tmp_path / "eager")]), CPU_ENV)
    compiled_folder = tmp_path / "compiled"
    compiled = train(load_config([*base, "--job.dump_folder", str(compiled_folder),
                                  "--training.compile", "true"]), CPU_ENV)
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=0, atol=LOSS_ATOL)
    for mine, theirs in zip(compiled.model_parts[0].parameters(),
                            eager.model_parts[0].parameters()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=COMPILED_PARAM_ATOL)
    assert "torch.compile: step 1 took" in capsys.readouterr().out
    assert os.listdir(compiled_folder / "inductor_cache")  # Inductor's cache, with the run


@pytest.mark.slow
def test_compiled_fsdp_with_full_ac_matches_one_eager_process(tmp_path, reference):
    result = run_layout(tmp_path, "fsdp-compiled", 2, "--training.local_batch_size", "2",
                        "--training.compile", "true", "--activation_checkpoint.mode", "full")
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=0, atol=LOSS_ATOL)
    for name, value in reference["params"].items():
        torch.testing.assert_close(result["params"][name], value, rtol=0,
                                   atol=COMPILED_PARAM_ATOL)


def test_compile_with_activation_offload_is_refused(repo_cwd):
    cfg = load_config(["--training.compile", "true", "--activation_checkpoint.offload", "true"])
    assert any(p.startswith("training.compile: not with activation_checkpoint.offload")
               for p in check_job(cfg, 1))
