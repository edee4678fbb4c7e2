"""Activation offloading: the same gradients, with the checkpointed blocks' inputs moved out."""

from dataclasses import replace

import pytest
import torch

from titan_lite.build import check_job
from titan_lite.config import ActivationCheckpoint, load_config
from titan_lite.loss import loss_head
from titan_lite.models.llama3 import FLAVORS, Transformer
from titan_lite.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_lite.parallel.activation_offload import MIN_BYTES, OffloadSavedActivations
from titan_lite.parallel.init import materialize

ARGS = replace(FLAVORS["debugmodel"], vocab_size=300, max_seq_len=256)
BATCH = 4  # x 256 tokens x dim 256 x 4 bytes: a 1 MiB block input, worth offloading


def step(model: Transformer, offload: bool):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ARGS.vocab_size, (BATCH, ARGS.max_seq_len + 1),
                           generator=generator)
    model.zero_grad(set_to_none=True)
    copies: list[torch.Tensor] = []
    hooks = OffloadSavedActivations(model, copies.append) if offload else torch.enable_grad()
    with hooks:
        loss = model(tokens[:, :-1], head=loss_head(tokens[:, 1:], chunks=2))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, copies


def test_offloaded_saved_activations_give_the_same_gradients():
    with torch.device("meta"):
        model = Transformer(ARGS)
    apply_activation_checkpointing(model, ActivationCheckpoint(mode="full"))
    materialize(model, 0, torch.device("cpu"), torch.device("cpu"))
    loss, grads, _ = step(model, offload=False)
    offloaded_loss, offloaded_grads, copies = step(model, offload=True)
    assert torch.equal(offloaded_loss, loss)
    for name, grad in grads.items():
        assert torch.equal(offloaded_grads[name], grad), name
    # full AC saves each block's input (and the final norm its own); parameters, the RoPE
    # table and small tensors (here the loss slices' halves of the last hidden states) stay
    assert BATCH * ARGS.max_seq_len * ARGS.dim * 4 >= MIN_BYTES
    assert len(copies) >= ARGS.n_layers
    assert all(c.shape == (BATCH, ARGS.max_seq_len, ARGS.dim) for c in copies)


def offloaded_step(args, mode: str, autocast: bool = False, packed: bool = False):
    """Loss, gradients and host copies of one offloaded step; the no-offload step's too."""
    with torch.device("meta"):
        model = Transformer(args)
    apply_activation_checkpointing(model, ActivationCheckpoint(mode=mode))
    materialize(model, 0, torch.device("cpu"), torch.device("cpu"))
    tokens = torch.randint(0, args.vocab_size, (2, 129), generator=torch.Generator().manual_seed(0))
    kwargs = {"positions": torch.arange(128).remainder(64).expand(2, 128)} if packed else {}
    results = []
    for offload in (False, True):
        model.zero_grad(set_to_none=True)
        copies: list[torch.Tensor] = []
        hooks = OffloadSavedActivations(model, copies.append) if offload else torch.enable_grad()
        with hooks, torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = model(tokens[:, :-1], head=loss_head(tokens[:, 1:], chunks=1), **kwargs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        copies))
    return results


WIDE = replace(FLAVORS["debugmodel"], dim=512, n_heads=8, vocab_size=1100, max_seq_len=128)


@pytest.mark.parametrize("mode, autocast, packed", [
    ("full", False, False), ("full", False, True), ("none", False, False), ("none", True, True)])
def test_only_activations_move_each_once(monkeypatch, mode, autocast, packed):
    """No weight moves (the parameter, ``weight.t()``, autocast's bfloat16 copy), no data
    moves twice (a tensor several ops save, the packed samples' mask), gradients unchanged;
    with full AC each block adds exactly its input."""
    monkeypatch.setattr("titan_lite.parallel.activation_offload.MIN_BYTES", 2**16)

    def moved(n_layers: int) -> list[torch.Tensor]:
        args = replace(WIDE, n_layers=n_layers)
        (loss, grads, _), (offloaded_loss, offloaded_grads, copies) = offloaded_step(
            args, mode, autocast, packed)
        assert torch.equal(offloaded_loss, loss)
        for name, grad in grads.items():
            assert torch.equal(offloaded_grads[name], grad), name
        return copies

    copies = moved(2)
    weight_shapes = {(a, b) for a, b in [(512, 512), (512, 1100), (512, 1536)]}
    weight_shapes |= {(b, a) for a, b in weight_shapes}
    assert not [c.shape for c in copies if tuple(c.shape) in weight_shapes]
    for i, a in enumerate(copies):  # (a duplicate would be an equal copy; under autocast
        # each linear casts its input itself: equal tensors that the GPU holds apart too)
        assert autocast or not any(a.shape == b.shape and torch.equal(a, b)
                                   for b in copies[i + 1:])
    if mode == "full":
        block_input = 2 * 128 * 512 * 4
        grown = sum(c.nbytes for c in moved(4)) - sum(c.nbytes for c in copies)
        assert grown == 2 * block_input


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine refuses it")
def test_activation_offload_is_refused_on_cpu(repo_cwd):
    problems = check_job(load_config(["--activation_checkpoint.offload", "true"]), 1)
    assert any(p.startswith("activation_checkpoint.offload: needs a GPU") for p in problems)
