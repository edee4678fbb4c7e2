import json

import torch

from titan_lite.config import Metrics
from titan_lite.metrics import MetricsLogger, gpu_peak_flops


def test_gpu_peaks_match_the_most_specific_name():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.float32) == 19.5e12
    assert gpu_peak_flops("Some Future GPU", torch.bfloat16) is None


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
