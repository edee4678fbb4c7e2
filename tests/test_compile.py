"""training.compile: compiled blocks and loss reproduce eager training (fp32, CPU Inductor)."""

import os

import pytest
import torch
from layouts import LOSS_ATOL, run_layout

from titan_lite.build import check_job
from titan_lite.config import load_config

# Inductor fuses and reorders float32 arithmetic: rounding-level differences, which AdamW's
# division by the gradients' RMS makes visible in the weights after a few steps.
COMPILED_PARAM_ATOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("ranks, ac", [(1, "selective"), (2, "full")])
def test_compiled_training_matches_one_eager_process(tmp_path, reference, monkeypatch, ranks,
                                                     ac):
    """Compiled blocks (under op-level selective or full AC, in one process or on 2 FSDP
    ranks) and compiled cross entropy over 2 loss slices reproduce the eager reference."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # (read at import: fresh)
    result = run_layout(tmp_path, "compiled", ranks,
                        "--training.local_batch_size", str(4 // ranks),
                        "--training.compile", "true", "--activation_checkpoint.mode", ac,
                        "--training.loss_chunks", "2", fresh=True)
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=0, atol=LOSS_ATOL)
    for name, value in reference["params"].items():
        torch.testing.assert_close(result["params"][name], value, rtol=0,
                                   atol=COMPILED_PARAM_ATOL)
    assert os.listdir(tmp_path / "compiled" / "inductor_cache")  # with the run's outputs


def test_compile_with_what_it_cannot_honour_is_refused(repo_cwd):
    cfg = load_config(["--training.compile", "true", "--activation_checkpoint.offload", "true"])
    assert any(p.startswith("training.compile: not with activation_checkpoint.offload")
               for p in check_job(cfg, 1))
    tp = load_config(["--training.compile", "true", "--parallelism.tensor_parallel_degree", "2",
                      "--parallelism.dp_shard", "1"])
    assert any(p.startswith("training.compile: not with tensor parallel")
               for p in check_job(tp, 2))
