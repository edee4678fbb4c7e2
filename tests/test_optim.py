import pytest
import torch

from titan_lite.config import LRScheduler, Optimizer
from titan_lite.optim import build_lr_scheduler, build_optimizer, lr_factor


def test_warmup_then_linear_decay_towards_the_floor():
    cfg = LRScheduler(warmup_steps=3, decay_type="linear", min_lr_ratio=0.1)
    factors = [lr_factor(s, 10, cfg) for s in range(1, 11)]
    assert factors[:3] == pytest.approx([1 / 3, 2 / 3, 1])
    assert all(a > b for a, b in zip(factors[2:], factors[3:]))
    assert factors[-1] == pytest.approx(0.1 + 0.9 * (1 - 7 / 8)) and factors[-1] > 0.1


def test_cosine_and_constant_shapes():
    cosine = LRScheduler(warmup_steps=0, decay_type="cosine", min_lr_ratio=0.0)
    assert lr_factor(1, 99, cosine) == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(
        torch.pi / 100)).item()))
    assert lr_factor(50, 99, cosine) == pytest.approx(0.5, abs=1e-12)
    constant = LRScheduler(warmup_steps=2, decay_type="constant")
    assert [lr_factor(s, 5, constant) for s in range(1, 6)] == pytest.approx(
        [0.5, 1, 1, 1, 1])


def test_scheduler_sets_the_lr_of_each_optimizer_step():
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, Optimizer(lr=1.0))
    cfg = LRScheduler(warmup_steps=2, decay_type="linear")
    scheduler = build_lr_scheduler(optimizer, cfg, total_steps=6)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr_factor(s, 6, cfg) for s in range(1, 7)])


@pytest.mark.parametrize("implementation", ["foreach", "fused", "for-loop"])
def test_weight_decay_only_on_matrices(implementation):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, Optimizer(weight_decay=0.5, implementation=implementation))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and [p.ndim for p in decay["params"]] == [2]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])
