"""float16 compute with dynamic loss scaling: unscaled gradients at clipping, skipped steps on
inf/NaN gradients agreed by every rank, the scale resumed from checkpoints."""

import json
import shutil

import pytest
import torch
from conftest import CPU_ENV
from dist_helpers import run_distributed
from layouts import _train_and_save

import titan_lite.train as train_module
from titan_lite.config import load_config
from titan_lite.runtime.distributed import local_shard
from titan_lite.train import train

# 2 x 64 tokens a step; constant LR after one warmup step, so a run of N steps and the first N
# steps of a longer run take the same updates.
BASE = ["--training.seq_len", "64", "--training.local_batch_size", "2",
        "--metrics.cpu_peak_tflops", "1", "--lr_scheduler.warmup_steps", "1",
        "--lr_scheduler.decay_type", "constant", "--training.max_norm", "0.5"]
FP16 = ["--training.mixed_precision_param", "float16"]


def run(folder, *overrides: str):
    return train(load_config([*BASE, "--job.dump_folder", str(folder), *overrides]), CPU_ENV)


def overflow_at(step: int, rank: int | None = None):
    """A forward_backward that leaves an inf in one gradient element at ``step`` (on ``rank``,
    or every rank): an overflow of the loss-scaled float16 gradients, as the scaler sees it."""
    original, calls = train_module.forward_backward, []

    def forward_backward(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(None)
        here = rank is None or torch.distributed.get_rank() == rank
        if len(calls) == step and here:
            runner = args[0]
            grad = next(p.grad for p in runner.parameters() if p.grad is not None)
            local_shard(grad).view(-1)[0] = float("inf")
        return loss

    return forward_backward


@pytest.mark.parametrize("method", [[], ["--lora.enable", "true"]], ids=["full", "lora"])
def test_float16_reports_and_clips_the_unscaled_gradients(repo_cwd, tmp_path, method):
    """Full training, and LoRA (a bfloat16 frozen base computed in float16 by autocast)."""
    fp32 = run(tmp_path / "fp32", "--training.steps", "2", *method)
    fp16 = run(tmp_path / "fp16", "--training.steps", "2", *FP16, *method)
    torch.testing.assert_close(fp16.losses, fp32.losses, rtol=0, atol=2e-2)
    assert fp16.skipped_steps == [] and fp16.loss_scale == 2.0**16
    norms = {}
    for name in ("fp32", "fp16"):
        with open(tmp_path / name / "metrics" / "rank0.jsonl") as fh:
            norms[name] = [json.loads(line)["grad_norm"] for line in fh]
    # scaled, the float16 gradients' norm would be 65,536 times larger
    torch.testing.assert_close(norms["fp16"], norms["fp32"], rtol=2e-2, atol=0)


def test_an_overflowing_step_is_skipped_and_leaves_weights_and_adamw_alone(
        repo_cwd, tmp_path, monkeypatch, capsys):
    one_step = run(tmp_path / "one", "--training.steps", "1", *FP16)
    monkeypatch.setattr(train_module, "forward_backward", overflow_at(2))
    skipped = run(tmp_path / "skip", "--training.steps", "2", *FP16)
    assert skipped.skipped_steps == [2] and skipped.loss_scale == 2.0**15
    assert "scale 32768 (skipped 1 step(s): inf/nan gradients)" in capsys.readouterr().out
    for mine, theirs in zip(skipped.model_parts[0].parameters(),
                            one_step.model_parts[0].parameters()):
        assert torch.equal(mine, theirs)
    for mine, theirs in zip(skipped.optimizer.state.values(), one_step.optimizer.state.values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)  # step counts included


def test_loss_scale_resumes_exactly(repo_cwd, tmp_path, monkeypatch):
    ckpt = ["--checkpoint.enable", "true", "--checkpoint.interval", "2", *FP16]
    monkeypatch.setattr(train_module, "forward_backward", overflow_at(1))
    straight = run(tmp_path / "straight", "--training.steps", "4", *ckpt)
    assert straight.skipped_steps == [1]
    monkeypatch.undo()
    resumed_folder = tmp_path / "resumed" / "checkpoint"
    resumed_folder.mkdir(parents=True)
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-2", resumed_folder / "step-2")
    resumed = run(tmp_path / "resumed", "--training.steps", "4", *ckpt)
    assert resumed.losses == straight.losses[2:]  # bitwise
    assert resumed.loss_scale == straight.loss_scale == 2.0**15


def _train_with_overflow(rank: int, world_size: int, argv: list[str], out: str) -> None:
    train_module.forward_backward = overflow_at(2, rank=1)  # only rank 1's shard overflows
    _train_and_save(rank, world_size, argv, out)


@pytest.mark.slow
def test_ranks_agree_on_skipping_a_step_one_rank_overflowed(tmp_path):
    """FSDP on 2 ranks with CPU offload (gradients on the host): rank 1's inf skips the step
    on both ranks, so their shards stay one model."""
    argv = [*BASE, *FP16, "--training.steps", "3", "--training.enable_cpu_offload", "true",
            "--job.dump_folder", str(tmp_path / "run")]
    out = str(tmp_path / "fsdp.pt")
    run_distributed(_train_with_overflow, 2, argv, out)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=True) for r in range(2)]
    assert ranks[0]["losses"] == ranks[1]["losses"]
    for rank in ranks:
        assert rank["skipped_steps"] == [2] and rank["loss_scale"] == 2.0**15


def test_loss_scaler_follows_torchs_grad_scaler():
    """Same scale after every step as torch.amp.GradScaler, the reference rule, over a run of
    overflows and good steps (growth interval shortened to 3), and the same unscaled
    gradients."""
    from titan_lite.optim import LossScaler

    ours = LossScaler(enabled=True, growth_interval=3)
    theirs = torch.amp.GradScaler("cpu", growth_interval=3)
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([param], lr=0.0)
    for overflow in [False, True, False, False, False, False, True, True, False, False, False]:
        theirs.scale(torch.ones(()))  # (GradScaler makes its scale tensor here)
        param.grad = torch.full((4,), float("inf") if overflow else 3.0 * theirs.get_scale())
        theirs.unscale_(optimizer)
        expected = param.grad.clone()
        param.grad = torch.full((4,), float("inf") if overflow else 3.0 * ours.get_scale())
        ours.unscale_([param])
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=0)
        theirs.step(optimizer)
        theirs.update()
        ours.update(found_inf=overflow)
        assert ours.get_scale() == theirs.get_scale()
