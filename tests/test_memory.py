"""The CPU tensor-memory tracker counts what is allocated and freed, once per storage."""

import torch

from titan_lite.runtime.memory import TensorMemoryTracker
from titan_lite.runtime.metrics import peak_memory_bytes

MIB = 2**20


def test_counts_allocations_once_and_subtracts_frees():
    tracker = TensorMemoryTracker()
    with tracker:
        a = torch.empty(MIB, dtype=torch.uint8)
        view = a[: MIB // 2]  # same storage: not counted again
        b = a.float()  # 4 MiB
        assert tracker.live_bytes == 5 * MIB
        del a, view, b
        assert tracker.live_bytes == 0
        c = torch.ones(2 * MIB, dtype=torch.uint8)
    assert tracker.peak_bytes == 5 * MIB and tracker.live_bytes == 2 * MIB
    del c
    assert tracker.live_bytes == 0
    tracker.reset_peak()
    assert tracker.peak_bytes == 0


def test_external_tensors_and_storage_resizes_are_followed():
    weight = torch.zeros(MIB, dtype=torch.uint8)
    original_resize = torch.UntypedStorage.resize_
    tracker = TensorMemoryTracker()
    tracker.track([weight, weight.view(2, -1)])
    assert tracker.live_bytes == MIB
    with tracker:
        weight.untyped_storage().resize_(0)  # how FSDP2 frees a gathered parameter
        assert tracker.live_bytes == 0
        weight.untyped_storage().resize_(3 * MIB)
        assert tracker.live_bytes == tracker.peak_bytes == 3 * MIB
    assert torch.UntypedStorage.resize_ is original_resize  # the patch is gone on exit
    assert tracker.live_bytes == 3 * MIB


def test_backward_and_optimizer_tensors_are_seen():
    layer = torch.nn.Linear(256, 256, bias=False)
    optimizer = torch.optim.AdamW(layer.parameters(), foreach=True)
    tracker = TensorMemoryTracker()
    tracker.track(layer.parameters())
    with tracker:
        layer(torch.randn(4, 256)).sum().backward()
        optimizer.step()
    weight_bytes = 256 * 256 * 4
    # weight + its gradient + AdamW's two moments (and a step counter) stay alive.
    assert tracker.live_bytes >= 4 * weight_bytes
    assert peak_memory_bytes(torch.device("cpu"), tracker) == (tracker.peak_bytes, "tensors")
