"""The host optimizer's knobs: the step in backward (optimizer.in_backward) and compact AdamW
states (optimizer.state_dtype), against torch's and torchao's AdamW and the ordinary step."""

import os
import shutil

import pytest
import torch
from conftest import CPU_ENV, REPO
from dist_helpers import run_distributed
from layouts import BASE, run_layout

from titan_lite.optim import compact as optim_compact
from titan_lite.checkpoint import complete_steps
from titan_lite.config import load_config
from titan_lite.runtime.distributed import DistEnv, local_shard
from titan_lite.runtime.memory import storages, tensor_bytes
from titan_lite.optim.compact import SlicedAdamW
from titan_lite.optim.in_backward import StepInBackward
from titan_lite.train import train

OFFLOAD = ["--training.enable_cpu_offload", "true", "--training.max_norm", "0"]
CKPT = ["--checkpoint.enable", "true", "--checkpoint.interval", "2",
        "--checkpoint.keep_latest_k", "0", "--training.steps", "4"]


def _adamw_pair(state_dtype, seed=0):
    torch.manual_seed(seed)
    ours = [torch.nn.Parameter(torch.randn(rows, 512)) for rows in (3, 24)] + [
        torch.nn.Parameter(torch.randn(512))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    options = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return ours, SlicedAdamW(ours, state_dtype, **options), theirs, options


def _step_both(ours, optimizer, theirs, reference, steps=5):
    for step in range(steps):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a) * (step + 1)
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()


def test_float32_states_step_exactly_as_torch_adamw_slice_by_slice(monkeypatch):
    monkeypatch.setattr(optim_compact, "SLICE", 1024)  # several slices per tensor
    ours, optimizer, theirs, options = _adamw_pair(torch.float32)
    _step_both(ours, optimizer, theirs, torch.optim.AdamW(theirs, fused=True, **options))
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_int8_states_follow_torchao_adamw8bit_and_are_two_bytes(monkeypatch):
    """torchao's 8-bit AdamW (same map, same blocks) is the reference for the format."""
    torchao_optim = pytest.importorskip("torchao.optim")
    monkeypatch.setattr(optim_compact, "SLICE", 1024)
    ours, optimizer, theirs, options = _adamw_pair(torch.uint8)
    _step_both(ours, optimizer, theirs, torchao_optim.AdamW8bit(theirs, **options))
    for a, b in zip(ours, theirs):
        # seen: 1e-6 from torchao's, 1.1e-3 from float32 moments' (so this tells them apart)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    big = optimizer.state[ours[1]]  # 24 x 512: quantised; 3 x 512 and the vector: float32
    assert big["exp_avg"].dtype == torch.uint8 and big["exp_avg_scale"].shape == (24, 2)
    assert optimizer.state[ours[0]]["exp_avg"].dtype == torch.float32
    quantised = sum(tensor_bytes(v) for v in big.values()) / ours[1].numel()
    assert quantised == pytest.approx(optim_compact.state_bytes_per_parameter("int8"), abs=0.01)


def test_bfloat16_states_stay_close_to_float32():
    ours, optimizer, theirs, options = _adamw_pair(torch.bfloat16)
    _step_both(ours, optimizer, theirs, torch.optim.AdamW(theirs, **options))
    assert optimizer.state[ours[1]]["exp_avg_sq"].dtype == torch.bfloat16
    for a, b in zip(ours, theirs):  # seen: 1.3e-4 (int8 moments: 1.1e-3)
        torch.testing.assert_close(a, b, rtol=0, atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("world_size,micro", [
    (1, ["--training.local_batch_size", "2", "--training.global_batch_size", "4"]),
    (2, ["--training.local_batch_size", "1", "--training.global_batch_size", "4",
         "--parallelism.fsdp_reduce_every_microbatch", "true"]),
])
def test_step_in_backward_equals_the_ordinary_step_bit_for_bit(tmp_path, world_size, micro):
    ordinary = run_layout(tmp_path, "ordinary", world_size, *OFFLOAD, *micro)
    in_backward = run_layout(tmp_path, "in_backward", world_size, *OFFLOAD, *micro,
                             "--optimizer.in_backward", "true")
    assert in_backward["losses"] == ordinary["losses"]
    for name, value in ordinary["params"].items():
        assert torch.equal(in_backward["params"][name], value), name


@pytest.mark.parametrize("state_dtype", ["bfloat16", "int8"])
def test_resume_is_exact_with_compact_states(repo_cwd, tmp_path, state_dtype):
    argv = [*BASE, *CKPT, "--optimizer.state_dtype", state_dtype, "--training.local_batch_size",
            "2"]
    straight = train(load_config([*argv, "--job.dump_folder", str(tmp_path / "a")]), CPU_ENV)
    shutil.copytree(tmp_path / "a" / "checkpoint" / "step-2",
                    tmp_path / "b" / "checkpoint" / "step-2")
    resumed = train(load_config([*argv, "--job.dump_folder", str(tmp_path / "b")]), CPU_ENV)
    assert resumed.losses == straight.losses[2:]
    states = straight.optimizer.state.values()
    assert {s["exp_avg"].dtype for s in states} >= {optim_compact.STATE_DTYPES[state_dtype]}


def _bounded_gradients_worker(rank: int, world_size: int, argv: list[str], out: str) -> None:
    """Train with a probe on every gradient's arrival: the bytes of gradients then alive."""
    os.chdir(REPO)
    alive: list[int] = []
    arrive = StepInBackward._gradient_ready

    def probe(self, param):
        buffers = {s.data_ptr(): s.nbytes() for p in self._unit_of if p.grad is not None
                   for s in storages(p.grad)}  # (a unit's gradients are views of one buffer)
        alive.append(sum(buffers.values()))
        arrive(self, param)

    StepInBackward._gradient_ready = probe
    result = train(load_config(argv), DistEnv(rank, rank, world_size, world_size,
                                              torch.device("cpu")))
    units = [sum(tensor_bytes(p) for p in unit)
             for unit in result.optimizer.units]
    torch.save({"alive": alive, "units": units, "losses": result.losses}, f"{out}.{rank}")


@pytest.mark.slow
def test_step_in_backward_holds_two_units_of_gradients_at_most(tmp_path):
    """The host holds the unit being stepped and the one arriving, never the whole gradient;
    int8 states resume exactly on 2 FSDP ranks (sharded codes and scales)."""
    argv = [*BASE, *OFFLOAD, *CKPT, "--optimizer.in_backward", "true",
            "--optimizer.state_dtype", "int8", "--training.local_batch_size", "2"]
    out = str(tmp_path / "probe")
    run_distributed(_bounded_gradients_worker, 2,
                    [*argv, "--job.dump_folder", str(tmp_path / "a")], out)
    for rank in range(2):
        seen = torch.load(f"{out}.{rank}", weights_only=True)
        two_largest = sum(sorted(seen["units"])[-2:])
        assert max(seen["alive"]) <= two_largest < sum(seen["units"]) / 2
    assert complete_steps(str(tmp_path / "a" / "checkpoint")) == [2, 4]
    shutil.copytree(tmp_path / "a" / "checkpoint" / "step-2",
                    tmp_path / "b" / "checkpoint" / "step-2")
    resumed = run_layout(tmp_path, "b", 2, *argv[len(BASE):])
    assert resumed["losses"] == seen["losses"][2:]


def _float16_overflow_worker(rank: int, world_size: int, argv: list[str], out: str) -> None:
    """Train in float16, stepping in backward; at step 2 rank 0 finds an inf in the first
    gradient of the first block's unit before that unit steps."""
    os.chdir(REPO)
    arrive, seen = StepInBackward._gradient_ready, []

    def inject(self, param):
        arrive(self, param)  # (not the unit's last parameter: its step has not started)
        if self._armed and param is self.units[1][0]:
            seen.append(None)
            if len(seen) == 2 and rank == 0:
                local_shard(param.grad).view(-1)[0] = float("inf")

    StepInBackward._gradient_ready = inject
    result = train(load_config(argv), DistEnv(rank, rank, world_size, world_size,
                                              torch.device("cpu")))
    steps = [int(result.optimizer.state[unit[0]]["step"]) for unit in result.optimizer.units]
    torch.save({"steps": steps, "skipped": result.skipped_steps, "scale": result.loss_scale,
                "losses": result.losses}, f"{out}.{rank}")


@pytest.mark.slow
def test_float16_overflow_skips_that_units_step_and_halves_the_scale_on_every_rank(tmp_path):
    argv = [*BASE, *OFFLOAD, "--optimizer.in_backward", "true", "--training.local_batch_size",
            "2", "--training.mixed_precision_param", "float16", "--job.dump_folder",
            str(tmp_path / "run")]
    out = str(tmp_path / "result")
    run_distributed(_float16_overflow_worker, 2, argv, out)
    for rank in range(2):
        seen = torch.load(f"{out}.{rank}", weights_only=True)
        assert seen["skipped"] == [2] and seen["scale"] == 2.0**15  # agreed by both ranks
        expected = [3] * len(seen["steps"])
        if rank == 0:
            expected[1] = 2  # the block's unit skipped step 2 on the rank that overflowed
        assert seen["steps"] == expected
        assert all(torch.isfinite(torch.tensor(seen["losses"])))
