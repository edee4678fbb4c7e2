"""Activation checkpointing: every mode gives the no-AC loss and gradients, and saves memory."""

import pytest
import torch
import torch.nn.functional as F

from titan_lite.config import ActivationCheckpoint
from titan_lite.finetune.lora import apply_lora
from titan_lite.runtime.memory import TensorMemoryTracker
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.parallel.activation_checkpoint import apply_activation_checkpointing
from titan_lite.parallel.init import materialize

CPU = torch.device("cpu")
# Narrow and long: activations (batch x seq x dim per op, per block) dwarf the weights.
ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                 max_seq_len=256)
MODES = [("none", "op"), ("full", "op"), ("selective", "op"), ("selective", "2")]


def build(mode: str, option: str, lora_dropout: float | None = None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ARGS)
    if lora_dropout is not None:
        apply_lora(model, rank=4, alpha=8, dropout=lora_dropout,
                   targets=["wq", "wv", "w1", "w2"], base_dtype=torch.float32)
    apply_activation_checkpointing(model, ActivationCheckpoint(mode=mode,
                                                               selective_ac_option=option))
    materialize(model, seed=0, compute_device=CPU, param_device=CPU)
    return model


def forward_backward(model: Transformer, tokens: torch.Tensor) -> tuple[float, dict, int]:
    """(loss, gradients, peak bytes above the weights) of one training micro-step."""
    tracker = TensorMemoryTracker()
    tracker.track(list(model.parameters()) + list(model.buffers()))
    weights = tracker.live_bytes
    with tracker:
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        del logits
        loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return loss.item(), grads, tracker.peak_bytes - weights


@pytest.fixture(scope="module")
def results() -> dict:
    tokens = torch.randint(0, ARGS.vocab_size, (8, 257), generator=torch.Generator().manual_seed(0))
    return {mode: forward_backward(build(*mode), tokens) for mode in MODES}


@pytest.mark.parametrize("mode", MODES[1:], ids=lambda m: "-".join(m))
def test_each_mode_gives_the_no_ac_loss_and_gradients(results, mode):
    loss, grads, _ = results[mode]
    reference_loss, reference_grads, _ = results[("none", "op")]
    assert loss == reference_loss  # recomputation repeats the same kernels: bit-identical
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("mode", MODES[1:], ids=lambda m: "-".join(m))
def test_recomputation_draws_the_forwards_dropout_masks(mode):
    """LoRA dropout under AC: backward must see the masks the forward drew."""
    tokens = torch.randint(0, ARGS.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    grads = {}
    for ac in (("none", "op"), mode):
        model = build(*ac, lora_dropout=0.3)
        for p in model.parameters():  # B starts at zero: give the adapters a gradient path
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(2))
        torch.manual_seed(3)
        grads[ac] = forward_backward(model, tokens)[1]
    for name, grad in grads[("none", "op")].items():
        if grad is not None:
            torch.testing.assert_close(grads[mode][name], grad, msg=name)


def test_ac_lowers_the_tracked_peak_memory(results):
    peak = {mode: results[mode][2] for mode in MODES}
    none, full = peak[("none", "op")], peak[("full", "op")]
    selective_op, every_2nd = peak[("selective", "op")], peak[("selective", "2")]
    assert full < 0.5 * none, peak  # only block inputs stay; one block is live at a time
    assert full < every_2nd < 0.9 * none, peak  # half of the blocks keep their activations
    assert full < selective_op < 0.9 * none, peak  # matmul/attention outputs kept, rest freed


def test_parameter_names_do_not_change_with_ac():
    names = [name for name, _ in build("none", "op").named_parameters()]
    for mode in MODES[1:]:
        assert [name for name, _ in build(*mode).named_parameters()] == names
