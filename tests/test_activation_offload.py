"""Activation offloading: the same gradients, with the checkpointed blocks' inputs moved out."""

from dataclasses import replace

import pytest
import torch

from titan_lite.config import ActivationCheckpoint, check_job, load_config
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine refuses it")
def test_activation_offload_is_refused_on_cpu(repo_cwd):
    problems = check_job(load_config(["--activation_checkpoint.offload", "true"]), 1)
    assert any(p.startswith("activation_checkpoint.offload: needs a GPU") for p in problems)
