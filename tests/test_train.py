import dataclasses
import json
import os
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import CPU_ENV, REPO, python_env
from dist_helpers import run_distributed

from titan_lite.config import load_config
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.parallel.accumulation import gradient_sync
from titan_lite.parallel.ddp import apply_ddp
from titan_lite.parallel.dims import ParallelDims, build_mesh, resolve_degrees
from titan_lite.train import TrainingError, tokens_per_rank_per_step, train

SHORT = ["--training.seq_len", "128", "--training.local_batch_size", "4",
         "--metrics.log_freq", "10"]


def run(repo_cwd, tmp_path, *overrides: str) -> list[float]:
    cfg = load_config([*SHORT, "--job.dump_folder", str(tmp_path), *overrides])
    return train(cfg, CPU_ENV).losses


def test_default_config_loss_falls(repo_cwd, tmp_path):
    losses = run(repo_cwd, tmp_path, "--training.steps", "30", "--lr_scheduler.warmup_steps", "3")
    assert losses[0] > 8.0  # ~ln(2256) + init noise: the model starts knowing nothing
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    records = [json.loads(line) for line in open(tmp_path / "metrics" / "rank0.jsonl")]
    assert [r["step"] for r in records] == [10, 20, 30]
    assert records[-1]["loss"] == losses[-1] and records[-1]["tokens_per_s"] > 0
    assert all(r["mfu_pct"] > 0 and r["peak_memory_gib"] > 0 for r in records)


def test_same_seed_gives_identical_losses_and_another_seed_does_not(repo_cwd, tmp_path):
    first = run(repo_cwd, tmp_path, "--training.steps", "2")
    assert run(repo_cwd, tmp_path, "--training.steps", "2") == first  # bitwise, fp32 on CPU
    assert run(repo_cwd, tmp_path, "--training.steps", "2", "--job.seed", "1") != first


def test_gradient_accumulation_equals_one_big_batch(repo_cwd, tmp_path):
    whole = run(repo_cwd, tmp_path, "--training.steps", "3", "--training.local_batch_size", "4",
                "--data.shuffle", "false")
    accumulated = run(repo_cwd, tmp_path, "--training.steps", "3", "--training.local_batch_size",
                      "2", "--training.global_batch_size", "4", "--data.shuffle", "false")
    # fp32, same samples in the same order, summed in two halves: rounding-level differences.
    torch.testing.assert_close(accumulated, whole, rtol=0, atol=2e-5)


def test_non_finite_loss_stops_with_the_step(repo_cwd, tmp_path):
    with pytest.raises(TrainingError, match=r"loss is (nan|inf) at step \d+"):
        run(repo_cwd, tmp_path, "--training.steps", "6", "--optimizer.lr", "1e30",
            "--lr_scheduler.warmup_steps", "0", "--training.max_norm", "0")


def _start_of_main(monkeypatch, *argv: str) -> dict:
    """What train.main hands init_distributed (which picks and starts the device), and the
    environment then; main stops there."""
    import titan_lite.train as train_module

    seen = {}

    def init_distributed(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs,
                    cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "init_distributed", init_distributed)
    with pytest.raises(SystemExit):
        train_module.main(list(argv))
    return seen


def test_deterministic_sets_cublas_workspace_before_the_device_starts(repo_cwd, monkeypatch,
                                                                     tmp_path):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG when CUDA starts (init_distributed picks the
    device); without it a deterministic run raises at its first CUDA matmul."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        seen = _start_of_main(monkeypatch, "--job.deterministic", "--job.dump_folder",
                              str(tmp_path))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    assert seen["cublas"] == ":4096:8"


def test_cpu_offload_gets_a_process_group_that_carries_cpu_tensors(repo_cwd, monkeypatch,
                                                                   tmp_path):
    """Under CPU offload the gradients (and their norm's all-reduce) are CPU tensors, which
    NCCL alone refuses: the CUDA group gets gloo for CPU tensors too (torchtitan's rule)."""
    from titan_lite.runtime.distributed import process_group_backend

    argv = ["--job.dump_folder", str(tmp_path), "--training.enable_cpu_offload"]
    assert _start_of_main(monkeypatch, *argv)["kwargs"]["host_collectives"] is True
    assert _start_of_main(monkeypatch, *argv[:2])["kwargs"]["host_collectives"] is False
    assert process_group_backend(use_cuda=True, host_collectives=True) == "cuda:nccl,cpu:gloo"
    assert process_group_backend(use_cuda=True, host_collectives=False) == "nccl"
    assert process_group_backend(use_cuda=False, host_collectives=True) == "gloo"


def test_float32_matmul_precision_is_applied(repo_cwd, tmp_path):
    try:
        run(repo_cwd, tmp_path, "--training.steps", "1", "--training.seq_len", "32",
            "--training.float32_matmul_precision", "high")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


def _ddp_grads_match_single_process(rank: int, world_size: int) -> None:
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                     max_seq_len=16)
    model = Transformer(args)
    model.init_weights(seed=rank)  # different local init: DDP must broadcast rank 0's weights
    reference = Transformer(args)
    reference.init_weights(seed=0)
    tokens = torch.randint(0, 50, (4, 17), generator=torch.Generator().manual_seed(0))
    mesh = build_mesh(ParallelDims(world_size, 1, 1, 1), "cpu", fsdp=False)
    ddp = apply_ddp(model, mesh)
    mine = tokens[rank::world_size]
    for micro in range(2):  # two accumulation steps; only the second one all-reduces
        with gradient_sync(ddp, micro == 1):
            half = mine[micro::2]
            loss = F.cross_entropy(ddp(half[:, :-1]).flatten(0, 1), half[:, 1:].flatten()) / 2
            loss.backward()
    F.cross_entropy(reference(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    dist.barrier()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process_gradients():
    run_distributed(_ddp_grads_match_single_process, 2)


def run_train_sh(tmp_path, ngpu: int, *overrides: str, **env: str
                 ) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["./run_train.sh", "--job.dump_folder", str(tmp_path), *SHORT, *overrides], cwd=REPO,
        env=python_env(**({"NGPU": str(ngpu)} if ngpu else {}), **env), capture_output=True,
        text=True, timeout=240)


# run_train.sh counts the visible GPUs with `python -c "...torch.cuda.device_count()"`: this
# makes that count (only in `python -c` processes) what FAKE_VISIBLE_GPUS says.
FAKE_GPUS = """import os, sys
if os.environ.get("FAKE_VISIBLE_GPUS") and sys.argv == ["-c"]:
    import torch
    torch.cuda.device_count = lambda: int(os.environ["FAKE_VISIBLE_GPUS"])
"""


def jsonl_losses(folder) -> list[float]:
    with open(os.path.join(folder, "metrics", "rank0.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


@pytest.mark.slow
def test_run_train_sh_one_and_two_ranks_give_the_same_losses(tmp_path):
    one = run_train_sh(tmp_path / "one", 1, "--training.steps", "3", "--metrics.log_freq", "1")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "step     3/3" in one.stdout
    # Two FSDP ranks (the default layout) with half the local batch each see the same batch;
    # without NGPU, as on a machine where two GPUs are visible (emulated: see FAKE_GPUS).
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(FAKE_GPUS)
    two = run_train_sh(tmp_path / "two", 0, "--training.steps", "3", "--metrics.log_freq", "1",
                       "--training.local_batch_size", "2", FAKE_VISIBLE_GPUS="2",
                       PYTHONPATH=str(tmp_path / "site"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.startswith("run_train.sh: 2 GPUs visible: launching 2 processes")
    # the console is kept beside the run's outputs, as it was shown
    logs = list((tmp_path / "two" / "logs").glob("run-*.log"))
    assert len(logs) == 1 and "[rank0]:step     3/3" in logs[0].read_text()
    # a clean exit (no exit-time abort of the process group); every other multi-rank launch of
    # the suite checks its exit status too
    assert "terminate called" not in two.stderr
    assert "dp_shard=2" in two.stdout and "with FSDP2" in two.stdout
    torch.testing.assert_close(jsonl_losses(tmp_path / "two"), jsonl_losses(tmp_path / "one"),
                               rtol=0, atol=2e-5)


@pytest.mark.slow
def test_run_train_sh_refuses_a_bad_config_before_launching(tmp_path):
    result = run_train_sh(tmp_path, 2, "--parallelism.dp_shard", "3")
    assert result.returncode == 2
    assert result.stderr.strip() == ("config error: parallelism: the degrees multiply to 3 but the "
                                     "world size is 2 (dp_replicate 1 x dp_shard 3 x tensor 1 x "
                                     "pipeline 1)")


@pytest.mark.parametrize("degrees, world, local_batch", [
    ({}, 1, 4),
    ({"dp_shard": 2}, 2, 2),  # data parallel: each rank its half of the batch
    ({"dp_shard": 1, "tensor_parallel_degree": 2}, 2, 4),  # both ranks on the same 4 sequences
    ({"dp_shard": 2, "pipeline_parallel_degree": 2}, 4, 2),
])
def test_tokens_per_rank_count_each_token_of_the_job_once(degrees, world, local_batch):
    cfg = load_config(["--training.seq_len", "64", "--training.local_batch_size",
                       str(local_batch)])
    cfg.parallelism = dataclasses.replace(cfg.parallelism, **degrees)
    dims, problems = resolve_degrees(cfg.parallelism, world)
    assert not problems and local_batch * dims.dp == 4  # the job's batch: 4 x 64 tokens
    assert tokens_per_rank_per_step(cfg, dims, world) == 4 * 64 // world


def _timeout_without_private_api(rank: int, world_size: int) -> None:
    import torch.distributed.distributed_c10d as c10d

    from titan_lite.runtime.distributed import set_collective_timeout

    assert set_collective_timeout(5, None) is None  # this torch has the private function
    del c10d._set_pg_timeout  # as if a later torch renamed it
    message = set_collective_timeout(5, None)
    assert message.startswith("comm.train_timeout_seconds is not applied: this torch")


def test_a_torch_without_the_private_timeout_api_trains_and_says_so():
    """titan_lite imports without torch's private _set_pg_timeout, and the run says that the
    shorter training timeout is not applied."""
    run_distributed(_timeout_without_private_api, 1)
