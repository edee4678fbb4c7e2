"""Chunked cross entropy: the same loss and gradients as in one piece, with a smaller peak."""

import torch

from titan_lite.loss import IGNORE_INDEX, cross_entropy_sum
from titan_lite.memory import TensorMemoryTracker


def logits_and_labels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 64, 2000, generator=generator).bfloat16().requires_grad_()
    labels = torch.randint(0, 2000, (2, 64), generator=generator)
    labels[:, :10] = IGNORE_INDEX  # masked prompts
    return logits, labels


def loss_grad_and_peak(chunks: int):
    logits, labels = logits_and_labels()
    tracker = TensorMemoryTracker()
    tracker.track([logits])
    with tracker:
        loss = cross_entropy_sum(logits, labels, chunks)
        loss.backward()
    return loss.detach(), logits.grad, tracker.peak_bytes


def test_chunked_cross_entropy_matches_one_piece_with_a_smaller_peak():
    loss, grad, peak = loss_grad_and_peak(1)
    chunked_loss, chunked_grad, chunked_peak = loss_grad_and_peak(8)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked_grad, grad, rtol=0, atol=0)  # per-token: exact
    # one piece: float32 logits, softmax and gradient of all 128 tokens; chunked: of 16
    assert chunked_peak < 0.6 * peak, (chunked_peak, peak)


def test_training_with_chunked_loss_matches_one_piece(repo_cwd):
    from conftest import CPU_ENV

    from titan_lite.config import load_config
    from titan_lite.train import train

    base = ["--training.seq_len", "64", "--training.local_batch_size", "2", "--training.steps",
            "2", "--metrics.log_freq", "100", "--metrics.cpu_peak_tflops", "1",
            "--metrics.enable_jsonl", "false"]
    one = train(load_config(base), CPU_ENV).losses
    chunked = train(load_config([*base, "--training.loss_chunks", "4"]), CPU_ENV).losses
    torch.testing.assert_close(chunked, one, rtol=0, atol=1e-5)
