import json

import torch

from titan_lite.config import Metrics
import pytest

from titan_lite.runtime.metrics import MetricsLogger, gpu_peak_flops, tf32_advice


def test_gpu_peaks_match_the_most_specific_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None


@pytest.mark.parametrize("name, bf16_tflops", [
    # names as torch.cuda.get_device_name reports them; whole words only
    ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA A10", 125.0), ("NVIDIA A10G", 70.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("Tesla T4", 65.0), ("NVIDIA GeForce RTX 2080 Ti", 53.8), ("NVIDIA GeForce RTX 3090", 71.0),
    ("NVIDIA GeForce RTX 3090 Ti", 80.0), ("NVIDIA GeForce RTX 3060", 25.6),
    ("NVIDIA H800", 989.0), ("NVIDIA B200", 2250.0), ("NVIDIA H100 NVL", 835.0),
])
def test_gpu_names_are_matched_as_whole_words(name, bf16_tflops):
    assert gpu_peak_flops(name, torch.bfloat16) == bf16_tflops * 1e12
    assert gpu_peak_flops(name, torch.float16) == bf16_tflops * 1e12


def test_float32_peak_follows_the_matmul_precision():
    name = "NVIDIA A100-SXM4-80GB"
    assert gpu_peak_flops(name, torch.float32, "highest") == 19.5e12
    assert gpu_peak_flops(name, torch.float32, "high") == 156e12  # TF32
    assert gpu_peak_flops(name, torch.float32, "medium") == 312e12  # bfloat16 inputs


def test_tf32_advice_only_where_float32_runs_without_it_on_a_gpu_that_has_it():
    assert "float32_matmul_precision" in tf32_advice((8, 0), torch.float32, "highest")
    assert tf32_advice((7, 5), torch.float32, "highest") is None  # T4: no TF32
    assert tf32_advice((9, 0), torch.float32, "high") is None
    assert tf32_advice((9, 0), torch.bfloat16, "highest") is None


def test_cuda_peak_memory_counts_from_the_start_of_training(monkeypatch, tmp_path):
    """The loading (e.g. NF4's dense weights) is not training's peak: the logger resets
    CUDA's peak counter when training starts and reports it (emulated allocator here)."""
    reset = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: reset.append(d))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d: 3 * 2**30)
    device = torch.device("cuda", 0)
    logger = MetricsLogger(Metrics(enable_jsonl=False), str(tmp_path), 0, device,
                           flops_per_token=1, peak=None, total_steps=2)
    assert reset == [device]
    record = logger.log(step=1, loss=1.0, grad_norm=1.0, lr=1e-3, tokens=10, seconds=1.0,
                        optimizer_seconds=0.1)
    assert record["peak_memory_gib"] == 3 and record["memory_kind"] == "cuda max allocated"


def test_jsonl_rank0_by_default_all_ranks_on_request(tmp_path, capsys):
    def log_as(rank: int, all_ranks: bool) -> None:
        logger = MetricsLogger(Metrics(jsonl_all_ranks=all_ranks), str(tmp_path), rank,
                               torch.device("cpu"), flops_per_token=1000, peak=1e9,
                               total_steps=4)
        logger.log(step=2, loss=3.5, grad_norm=0.5, lr=1e-3, tokens=2000, seconds=2.0,
                   optimizer_seconds=0.25)
        logger.close()

    log_as(1, all_ranks=False)
    assert not (tmp_path / "metrics" / "rank1.jsonl").exists()
    assert capsys.readouterr().out == ""  # only rank 0 prints
    log_as(1, all_ranks=True)
    log_as(0, all_ranks=False)
    record = json.loads((tmp_path / "metrics" / "rank0.jsonl").read_text())
    assert record["tokens_per_s"] == 1000 and record["mfu_pct"] == 100 * 1000 * 1000 / 1e9
    assert record["eta_s"] >= 0 and record["peak_memory_gib"] > 0
    assert (tmp_path / "metrics" / "rank1.jsonl").exists()
    out = capsys.readouterr().out
    assert "step     2/4  loss 3.5000" in out and "tok/s/rank 1,000" in out and "eta" in out
