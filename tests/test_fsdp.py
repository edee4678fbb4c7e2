"""FSDP2, CPU offload, mixed precision and gradient accumulation on gloo: numbers, not just runs.

Each layout trains the debug model for a few steps on 2 processes and is compared with one
process on the same global batch and seed: same losses, same final parameters.
"""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, python_env
from dist_helpers import run_distributed
from layouts import BASE, _full, assert_matches, run_layout
from torch.distributed.fsdp import CPUOffloadPolicy
from torch.distributed.tensor import DTensor

from titan_lite.config import Parallelism, Training, load_config
from titan_lite.runtime.distributed import DistEnv
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.parallel.dims import ParallelDims, build_mesh
from titan_lite.parallel.fsdp import apply_fsdp
from titan_lite.parallel.init import materialize
from titan_lite.train import train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

HALF = ["--training.local_batch_size", "2"]  # x 2 ranks = the reference's batch of 4
# 2 ranks x 1 sequence x 2 micro-batches = the reference's 4 sequences per step.
MICRO = ["--training.local_batch_size", "1", "--training.global_batch_size", "4"]
LAYOUTS = {
    "fsdp": HALF,
    "reshard-always": [*HALF, "--parallelism.fsdp_reshard_after_forward", "always"],
    "reshard-never": [*HALF, "--parallelism.fsdp_reshard_after_forward", "never"],
    "accumulate-reduce-every-micro": [*MICRO, "--parallelism.fsdp_reduce_every_microbatch", "true"],
    "accumulate-reduce-last-micro": [*MICRO, "--parallelism.fsdp_reduce_every_microbatch", "false"],
    "ac-full": [*HALF, "--activation_checkpoint.mode", "full"],
    "ac-selective-op": [*HALF, "--activation_checkpoint.mode", "selective"],
    "offload-ac-every-2nd-accumulate": [
        *MICRO, "--training.enable_cpu_offload", "true", "--activation_checkpoint.mode",
        "selective", "--activation_checkpoint.selective_ac_option", "2"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_two_rank_layouts_match_one_process(tmp_path, reference, layout):
    result = run_layout(tmp_path, layout, 2, *LAYOUTS[layout])
    assert_matches(result, reference)
    assert result["losses"][-1] < result["losses"][0]  # it trained


@pytest.mark.four_ranks
def test_hsdp_replicate_and_shard_match_one_process(tmp_path, reference):
    result = run_layout(tmp_path, "hsdp", 4, "--training.local_batch_size", "1",
                        "--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2")
    assert_matches(result, reference)



def _offload_worker(rank: int, world_size: int, argv: list[str], out: str) -> None:
    os.chdir(REPO)
    env = DistEnv(rank, rank, world_size, world_size, torch.device("cpu"))
    result = train(load_config(argv), env)
    model = result.model_parts[0]
    params = {name: _full(p) for name, p in model.named_parameters()}  # a collective
    if rank == 0:
        torch.save({"losses": result.losses, "params": params}, out)
    for module in [model, *model.layers.values()]:
        policy = module._get_fsdp_state()._fsdp_param_group.offload_policy
        assert isinstance(policy, CPUOffloadPolicy)
        assert policy.pin_memory is False  # pinning needs an accelerator; none here
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    states = [v for state in result.optimizer.state.values() for v in state.values()
              if isinstance(v, torch.Tensor) and v.ndim > 0]
    assert len(states) == 2 * len(params)  # exp_avg and exp_avg_sq of every parameter
    for name, tensor in [*model.named_parameters(), *[("grad", p.grad) for p in
                                                      model.parameters()],
                         *[("optimizer state", v) for v in states]]:
        assert isinstance(tensor, DTensor), name  # sharded ...
        assert tensor.to_local().device.type == "cpu", name  # ... and in host memory


def test_cpu_offload_matches_one_process_and_keeps_state_on_cpu(tmp_path, reference):
    out = str(tmp_path / "offload.pt")
    argv = [*BASE, "--job.dump_folder", str(tmp_path), "--training.local_batch_size", "2",
            "--training.enable_cpu_offload", "true"]
    run_distributed(_offload_worker, 2, argv, out)
    assert_matches(torch.load(out, weights_only=True), reference)


def test_cpu_offload_on_one_rank_matches_no_offload(tmp_path, reference):
    result = run_layout(tmp_path, "offload1", 1, "--training.local_batch_size", "4",
                        "--training.enable_cpu_offload", "true")
    assert_matches(result, reference)


def test_bf16_params_fp32_reduce_track_the_fp32_run(tmp_path, reference):
    result = run_layout(tmp_path, "bf16", 2, "--training.local_batch_size", "2",
                        "--training.mixed_precision_param", "bfloat16")
    # bf16 keeps 8 mantissa bits (~4e-3 relative): the loss (~8) moves by ~1e-3 (seen: 1.7e-3).
    torch.testing.assert_close(result["losses"], reference["losses"], rtol=0, atol=1e-2)
    assert result["losses"] != reference["losses"]  # the bf16 policy really was applied
    for name, value in reference["params"].items():
        assert result["params"][name].dtype == torch.float32, name  # sharded master weights


def _uneven_init_and_grads(rank: int, world_size: int) -> None:
    # Vocab 51 and FFN width 97 do not split evenly over 2 ranks: FSDP pads those shards.
    args = ModelArgs(dim=36, n_layers=2, n_heads=3, n_kv_heads=1, vocab_size=51, multiple_of=1,
                     ffn_dim_multiplier=1.0105, max_seq_len=16)
    assert args.ffn_hidden_dim % 2 == 1
    cpu = torch.device("cpu")
    with torch.device("meta"):
        reference, sharded = Transformer(args), Transformer(args)
    materialize(reference, seed=3, compute_device=cpu, param_device=cpu)
    mesh = build_mesh(ParallelDims(1, world_size, 1, 1), "cpu", fsdp=True)
    apply_fsdp(sharded, mesh, Training(), Parallelism())
    materialize(sharded, seed=3, compute_device=cpu, param_device=cpu)
    tokens = torch.randint(0, 51, (2, 17), generator=torch.Generator().manual_seed(0))
    for model in (reference, sharded):  # same batch on both ranks: the mean gradient is its own
        F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for (name, p), q in zip(sharded.named_parameters(), reference.parameters()):
        assert torch.equal(_full(p), q.detach()), name  # the same weights, bit for bit
        torch.testing.assert_close(_full(p.grad), q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_sharded_init_and_gradients_equal_one_process_with_uneven_shards():
    run_distributed(_uneven_init_and_grads, 2)


BAD_LAYOUTS = {
    "degrees": (["--parallelism.dp_shard", "4"],
                "parallelism: the degrees multiply to 4 but the world size is 2"),
    "tp-tied": (["--parallelism.tensor_parallel_degree", "2", "--model.flavor", "1B"],
                "parallelism.tensor_parallel_degree: tied input/output embeddings"),
    "pp-microbatch": (["--parallelism.pipeline_parallel_degree", "2",
                       "--training.local_batch_size", "3",
                       "--parallelism.pipeline_parallel_microbatch_size", "2"],
                      "parallelism.pipeline_parallel_microbatch_size: 2 does not divide"),
}


@pytest.mark.parametrize("case", list(BAD_LAYOUTS))
def test_each_rank_refuses_a_bad_layout_alone(tmp_path, case):
    """Each rank of a 2-rank job, started with no peer: it must print and exit 2 by itself.

    A rank that waited on a collective or the rendezvous first would hang here (no peer ever
    comes: the two are started as strangers, MASTER_PORT 1), so finishing inside the timeout
    proves the refusal needs nobody else.
    """
    overrides, message = BAD_LAYOUTS[case]
    ranks = [subprocess.Popen(
        [sys.executable, "-m", "titan_lite.train", "--job.dump_folder", str(tmp_path / str(rank)),
         *overrides], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=python_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                       LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"))
        for rank in (0, 1)]
    try:
        for rank, process in enumerate(ranks):
            _, stderr = process.communicate(timeout=60)
            assert process.returncode == 2, stderr[-3000:]
            assert f"[rank{rank}] config error: {message}" in stderr
            assert "Traceback" not in stderr
    finally:
        for process in ranks:
            process.kill()


def test_bad_layout_under_torchrun_exits_2_without_hanging(tmp_path):
    """Under torchrun the first rank to refuse exits 2; torchrun then stops its peers (SIGTERM),
    possibly before they print, so only the exit codes and one message are certain here."""
    overrides, message = BAD_LAYOUTS["degrees"]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--tee", "3", "-m", "titan_lite.train", "--job.dump_folder", str(tmp_path),
         *overrides],
        cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert re.search(rf"\[rank[01]\] config error: {re.escape(message)}", output), output[-3000:]
    codes = re.findall(r"exitcode  : (-?\d+)", output)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    worker_lines = [line for line in output.splitlines() if line.startswith("[default")]
    assert not any("Traceback" in line for line in worker_lines)  # torchrun's own is expected
