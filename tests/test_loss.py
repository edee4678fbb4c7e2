"""Chunked cross entropy (and output projection): the same loss and gradients as in one piece,
with a smaller peak."""

import torch

from titan_lite.loss import IGNORE_INDEX, cross_entropy_sum, loss_head
from titan_lite.runtime.memory import TensorMemoryTracker


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


def projection_loss_grads_and_peak(chunks: int):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 64, 32, generator=generator).requires_grad_()
    output = torch.nn.Linear(32, 2000, bias=False)
    torch.nn.init.normal_(output.weight, std=0.2, generator=generator)
    labels = torch.randint(0, 2000, (2, 64), generator=generator)
    labels[0, :20] = IGNORE_INDEX
    tracker = TensorMemoryTracker()
    tracker.track([hidden, output.weight])
    with tracker:
        loss = loss_head(labels, chunks)(hidden, output)
        loss.backward()
    return loss.detach(), hidden.grad, output.weight.grad, tracker.peak_bytes


def test_chunked_projection_and_loss_match_one_piece_without_the_full_logits():
    loss, hidden_grad, weight_grad, peak = projection_loss_grads_and_peak(1)
    chunked = projection_loss_grads_and_peak(8)
    torch.testing.assert_close(chunked[0], loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(chunked[1], hidden_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[2], weight_grad, rtol=1e-5, atol=1e-6)
    logits_bytes = 2 * 64 * 2000 * 4
    assert chunked[3] <= peak - logits_bytes, (chunked[3], peak)


def test_training_with_chunked_loss_matches_one_piece(repo_cwd):
    from conftest import CPU_ENV

    from titan_lite.config import load_config
    from titan_lite.train import train

    base = ["--training.seq_len", "64", "--training.local_batch_size", "2", "--training.steps",
            "2", "--metrics.log_freq", "100", "--metrics.cpu_peak_tflops", "1",
            "--metrics.enable_jsonl", "false", "--validation.split", "0.1",
            "--validation.interval", "2", "--validation.steps", "2"]
    one = train(load_config(base), CPU_ENV)
    chunked = train(load_config([*base, "--training.loss_chunks", "4"]), CPU_ENV)
    torch.testing.assert_close(chunked.losses, one.losses, rtol=0, atol=1e-5)
    torch.testing.assert_close(chunked.validation_losses, one.validation_losses, rtol=0,
                               atol=1e-5)
    assert set(one.validation_losses) == {0, 2}


def test_auto_loss_chunks_slices_large_vocabularies_only():
    from titan_lite.loss import AUTO_CHUNKS, resolve_loss_chunks

    assert resolve_loss_chunks(0, 128_256, 2 * 2048) == AUTO_CHUNKS == 8  # Llama 3
    assert resolve_loss_chunks(0, 32_000, 4096) == 8  # Llama 2
    assert resolve_loss_chunks(0, 2256, 4096) == 1  # the test tokenizer: one piece
    assert resolve_loss_chunks(0, 128_256, 5) == 5  # never more slices than tokens
    assert resolve_loss_chunks(3, 128_256, 4096) == 3  # a configured count is kept


def test_estimator_resolves_auto_loss_chunks(repo_cwd):
    from titan_lite.config import load_config
    from titan_lite.estimate import estimate_memory

    # LoRA: no AdamW states of the whole model, so the peak is in backward, at the loss
    flags = ["--model.flavor", "1B", "--training.seq_len", "256", "--training.local_batch_size",
             "1", "--tokenizer.path", "none", "--lora.enable", "true"]  # the flavor's 128k vocab
    auto = estimate_memory(load_config(flags), 1)
    one_piece = estimate_memory(load_config([*flags, "--training.loss_chunks", "1"]), 1)
    assert auto.cfg.training.loss_chunks == 8 and one_piece.cfg.training.loss_chunks == 1
    # at least the float32 logits of 256 tokens x 128,256 (125 MiB) are never whole
    assert one_piece.worst.device_peak - auto.worst.device_peak > 256 * 128_256 * 4
