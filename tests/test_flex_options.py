"""FlexAttention's tiles fit the shared memory of the card it runs on (the compiled backward
at head_dim 128 needs ~128 KB with torch's defaults; consumer cards have ~99 KB)."""

import types

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from titan_lite.models.llama3 import attention
from titan_lite.models.llama3.attention import (
    flex_backward_bytes,
    flex_forward_bytes,
    flex_kernel_options,
)

# shared_memory_per_block_optin as torch.cuda.get_device_properties reports it
CARDS = {"H100": 232448, "A100": 166912, "RTX 4090": 101376, "T4": 65536}
FORWARD_KEYS = ("fwd_BLOCK_M", "fwd_BLOCK_N", "fwd_num_stages")
BACKWARD_KEYS = ("bwd_BLOCK_M1", "bwd_BLOCK_N1", "bwd_BLOCK_M2", "bwd_BLOCK_N2",
                 "bwd_num_stages")


def test_torchs_default_backward_tiles_do_not_fit_a_consumer_card():
    # sm86's default (64, 64, 64, 64, 3 stages) at head_dim 128 in bf16: the failure reported
    assert flex_backward_bytes((64, 64, 64, 64, 3), 128, 2) == 131072 > CARDS["RTX 4090"]


@pytest.mark.parametrize("card", ["H100", "A100"])
def test_data_center_cards_keep_torchs_tuned_defaults(card):
    assert flex_kernel_options(CARDS[card], 128, 2) is None


@pytest.mark.parametrize("card", ["RTX 4090", "T4"])
@pytest.mark.parametrize("head_dim, element_bytes", [(128, 2), (64, 2), (128, 4), (96, 2)])
def test_smaller_cards_get_tiles_that_fit(card, head_dim, element_bytes):
    options = flex_kernel_options(CARDS[card], head_dim, element_bytes)
    padded = 1 << (head_dim - 1).bit_length()
    forward = tuple(options[k] for k in FORWARD_KEYS)
    backward = tuple(options[k] for k in BACKWARD_KEYS)
    assert flex_forward_bytes(forward, padded, element_bytes) <= CARDS[card] - 8192
    assert flex_backward_bytes(backward, padded, element_bytes) <= CARDS[card] - 8192
    # every tile divides the block mask's 128-token blocks (the kernel skips configs that don't)
    assert all(128 % options[k] == 0 for k in (*FORWARD_KEYS[:2], *BACKWARD_KEYS[:4]))


def test_the_largest_fitting_tiles_are_chosen():
    rtx4090 = flex_kernel_options(CARDS["RTX 4090"], 128, 2)
    assert [rtx4090[k] for k in FORWARD_KEYS] == [64, 64, 2]
    assert [rtx4090[k] for k in BACKWARD_KEYS] == [32, 64, 64, 32, 2]
    t4 = flex_kernel_options(CARDS["T4"], 128, 2)
    assert [t4[k] for k in BACKWARD_KEYS] == [32, 64, 64, 32, 1]


def test_options_come_from_the_devices_properties_and_flex_accepts_them(monkeypatch):
    seen = []

    def properties(device):
        seen.append(device)
        return types.SimpleNamespace(shared_memory_per_block_optin=CARDS["RTX 4090"])

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    attention._device_kernel_options.cache_clear()
    try:
        options = attention._device_kernel_options(torch.device("cuda", 1), 128, 2)
    finally:
        attention._device_kernel_options.cache_clear()
    assert seen == [torch.device("cuda", 1)]
    assert options == flex_kernel_options(CARDS["RTX 4090"], 128, 2)
    # the keys are FlexAttention's own (checked by its option parser, eager on CPU here)
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, 128, 128, device="cpu")
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=mask, kernel_options=options),
                               flex_attention(q, k, v, block_mask=mask))


@pytest.mark.slow  # one Inductor compile on this CPU: ~25 s
def test_the_compiled_block_mask_equals_the_eager_one_batch_after_batch():
    """CUDA builds the packed samples' block mask with a compiled create_block_mask (eager, it
    materialises batch x seq x seq booleans); here on CPU, for two batches of other sample
    lengths through the one compiled function, against the eager build and the dense mask."""
    from titan_lite.models.llama3.attention import document_block_mask, sample_ids

    for lengths in ([100, 156, 256], [300, 212]):
        positions = torch.cat([torch.arange(n) for n in lengths]).expand(2, 512)
        compiled = document_block_mask(positions)
        ids = sample_ids(positions)

        def same_sample_causal(b, h, q, k):
            return (ids[b, q] == ids[b, k]) & (k <= q)

        eager = create_block_mask(same_sample_causal, 2, None, 512, 512, device="cpu")
        assert torch.equal(compiled.to_dense(), eager.to_dense())
        assert torch.equal(compiled.kv_num_blocks, eager.kv_num_blocks)
        assert torch.equal(compiled.kv_indices, eager.kv_indices)
