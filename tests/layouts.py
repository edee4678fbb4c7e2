"""Train a layout on N gloo ranks and compare it with one process: the parity harness."""

import os

import torch
from conftest import REPO
from dist_helpers import run_distributed

from titan_lite.config import load_config
from titan_lite.runtime.distributed import DistEnv, full_tensor
from titan_lite.train import TrainResult, train

# 4 sequences of 64 tokens per step over all ranks; the MFU reference is not measured.
BASE = ["--training.seq_len", "64", "--training.steps", "3", "--metrics.log_freq", "100",
        "--metrics.cpu_peak_tflops", "1", "--lr_scheduler.warmup_steps", "1"]
# fp32 on CPU: sharding changes only the order of float additions (the reduce-scatter sums
# per-rank gradients), so losses agree to rounding level over 3 steps (seen: <= 1e-6). AdamW
# divides each gradient by its running RMS, which turns a rounding-level gradient difference on
# a near-zero gradient into a visible update difference: parameters are held to 2e-5 (seen:
# 6.4e-6), under 3% of one step's largest update (lr 8e-4).
LOSS_ATOL, PARAM_ATOL = 2e-5, 2e-5


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return full_tensor(tensor).detach().clone()


def train_as_rank(rank: int, world_size: int, argv: list[str]) -> TrainResult:
    """``train`` the job of ``argv``, from the repository's root, as one of ``world_size``
    CPU ranks (under ``run_distributed``)."""
    os.chdir(REPO)
    return train(load_config(argv), DistEnv(rank, rank, world_size, world_size,
                                            torch.device("cpu")))


def _train_and_save(rank: int, world_size: int, argv: list[str], out: str) -> None:
    result = train_as_rank(rank, world_size, argv)
    params = {name: _full(p) for part in result.model_parts  # full_tensor() is a collective
              for name, p in part.named_parameters() if p.requires_grad}  # (LoRA: adapters)
    torch.save({"losses": result.losses, "params": params,
                "validation": result.validation_losses, "skipped_steps": result.skipped_steps,
                "loss_scale": result.loss_scale}, f"{out}.rank{rank}")


def run_layout(tmp_path, name: str, world_size: int, *overrides: str, fresh: bool = False
               ) -> dict:
    """Losses and validation losses (as every rank logs them) and the full final parameters,
    merged over the ranks (pipeline stages hold different blocks; sharded ones are gathered).
    ``fresh``: on new processes (``run_distributed``'s)."""
    out = str(tmp_path / f"{name}.pt")
    argv = [*BASE, "--job.dump_folder", str(tmp_path / name), *overrides]
    run_distributed(_train_and_save, world_size, argv, out, fresh=fresh)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(world_size)]
    for r in ranks:  # every rank logs the same
        assert r["losses"] == ranks[0]["losses"] and r["validation"] == ranks[0]["validation"]
    params = {}
    for r in ranks:
        params.update(r["params"])
    return {"losses": ranks[0]["losses"], "params": params,
            "validation": ranks[0]["validation"]}


def assert_matches(result: dict, expected: dict) -> None:
    torch.testing.assert_close(result["losses"], expected["losses"], rtol=0, atol=LOSS_ATOL)
    assert result["params"].keys() == expected["params"].keys()
    for name, value in expected["params"].items():
        torch.testing.assert_close(result["params"][name], value, rtol=0, atol=PARAM_ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


