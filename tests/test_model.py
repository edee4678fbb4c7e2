import math
from dataclasses import replace

import pytest
import torch

from titan_lite.models.llama3 import FLAVORS, ModelArgs, RopeScaling, Transformer
from titan_lite.models.llama3.model import apply_rope, rope_frequencies, rope_table

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=32,
                 max_seq_len=32)


def build(args: ModelArgs = TINY, seed: int = 0) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed)  # the seed alone decides the weights, whatever construction drew
    return model


def test_logits_shape():
    model = build()
    tokens = torch.randint(0, TINY.vocab_size, (3, 17))
    assert model(tokens).shape == (3, 17, TINY.vocab_size)


def test_changing_a_future_token_never_changes_an_earlier_logit():
    model = build()
    tokens = torch.randint(0, TINY.vocab_size, (2, 24))
    changed = tokens.clone()
    changed[:, 15] = (changed[:, 15] + 1) % TINY.vocab_size
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :15], after[:, :15], rtol=0, atol=0)
    assert not torch.allclose(before[:, 15:], after[:, 15:])


def test_rope_scores_depend_only_on_relative_position():
    table = rope_table(TINY, 32)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q.expand(1, 32, 1, 16), table)[0, m, 0]
        kn = apply_rope(k.expand(1, 32, 1, 16), table)[0, n, 0]
        return qm @ kn

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score(0, 0), (q @ k.transpose(-1, -2)).squeeze(), rtol=1e-5,
                               atol=1e-5)
    x = torch.randn(2, 32, 3, 16)
    torch.testing.assert_close(apply_rope(x, table).norm(dim=-1), x.norm(dim=-1))


def test_rope_rotates_interleaved_pairs():
    # Meta's layout: pair (x0, x1) at position 1 rotates by angle theta^0 = 1 radian.
    table = rope_table(replace(TINY, dim=8, n_heads=4, n_kv_heads=4), 2)
    x = torch.zeros(1, 2, 1, 2)
    x[..., 0] = 1.0
    out = apply_rope(x, table)[0, 1, 0]
    torch.testing.assert_close(out, torch.tensor([math.cos(1.0), math.sin(1.0)]))


def test_llama31_rope_scaling_keeps_high_and_divides_low_frequencies():
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    base = rope_frequencies(128, 500000.0, None)
    scaled = rope_frequencies(128, 500000.0, scaling)
    wavelen = 2 * math.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert high.any() and low.any()
    torch.testing.assert_close(scaled[high], base[high])
    torch.testing.assert_close(scaled[low], base[low] / 8)
    mid = ~high & ~low
    assert ((scaled[mid] < base[mid]) & (scaled[mid] > base[mid] / 8)).all()


def test_gqa_equals_multi_head_attention_with_repeated_kv_heads():
    gqa = build(TINY)
    mha_args = replace(TINY, n_kv_heads=TINY.n_heads)
    mha = Transformer(mha_args)
    state = gqa.state_dict()
    group = TINY.n_heads // TINY.kv_heads
    for i in range(TINY.n_layers):
        for name in ("wk", "wv"):
            key = f"layers.{i}.attention.{name}.weight"
            heads = state[key].view(TINY.kv_heads, TINY.head_dim, TINY.dim)
            state[key] = heads.repeat_interleave(group, dim=0).reshape(-1, TINY.dim)
    mha.load_state_dict(state)
    tokens = torch.randint(0, TINY.vocab_size, (2, 20))
    torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_meta_build_then_init_matches_eager_build():
    eager = build(seed=3)
    with torch.device("meta"):
        lazy = Transformer(TINY)
    assert lazy.num_params() == eager.num_params()
    lazy.to_empty(device="cpu")
    torch.manual_seed(12345)  # the global RNG state does not matter
    lazy.init_weights(seed=3)
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(eager.rope, lazy.rope)
    assert not torch.equal(build(seed=4).layers["0"].attention.wq.weight,
                           eager.layers["0"].attention.wq.weight)


def test_each_unit_is_drawn_independently_of_the_others():
    """A block's weights do not depend on how many other blocks exist (pipeline stages)."""
    two, three = build(seed=5), build(replace(TINY, n_layers=3), seed=5)
    for name, value in two.state_dict().items():
        torch.testing.assert_close(three.state_dict()[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("flavor, params", [
    ("1B", 1_235_814_400), ("3B", 3_212_749_824), ("8B", 8_030_261_248),
    ("70B", 70_553_706_496), ("405B", 405_853_388_800),
    # Llama 2 as published (Touvron et al. 2023; the Hugging Face checkpoints' sizes)
    ("llama2_7B", 6_738_415_616), ("llama2_13B", 13_015_864_320),
    ("llama2_70B", 68_976_648_192)])
def test_published_flavors_have_published_parameter_counts(flavor, params):
    with torch.device("meta"):
        model = Transformer(replace(FLAVORS[flavor], max_seq_len=16))
    assert model.num_params() == params


def test_tied_flavor_has_no_output_matrix():
    tied = build(replace(TINY, tie_word_embeddings=True))
    assert tied.output is None
    assert tied.num_params() == build().num_params() - TINY.vocab_size * TINY.dim
    assert tied(torch.randint(0, TINY.vocab_size, (1, 5))).shape == (1, 5, TINY.vocab_size)


def test_flops_per_token_counts_matmuls_and_attention():
    model = build()
    a = TINY
    per_layer = (a.dim * a.dim * 2 + 2 * a.dim * a.kv_heads * a.head_dim
                 + 3 * a.dim * a.ffn_hidden_dim)
    matmul_params = a.n_layers * per_layer + a.vocab_size * a.dim
    attention = 12 * a.n_layers * a.n_heads * a.head_dim * 32
    assert model.flops_per_token(32) == 6 * matmul_params + attention


def test_sequence_longer_than_rope_table_is_refused():
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        build()(torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long))


@pytest.mark.parametrize("packed", [False, True], ids=["causal", "packed"])
def test_grouped_query_attention_keeps_no_expanded_keys_for_backward(packed):
    """The attention kernels share each kv head among its query heads: what autograd keeps
    for backward is the same as MHA's less the keys and values of the heads GQA does not have
    (an expanded copy would cost as much as MHA's)."""
    from titan_lite.models.llama3.model import Attention

    def saved_bytes(n_kv_heads: int) -> int:
        args = replace(TINY, n_heads=8, n_kv_heads=n_kv_heads)
        attention = Attention(args)
        x = torch.randn(2, 32, args.dim)
        rope = rope_table(args, 32)
        mask = None
        if packed:  # two samples per row: the additive document mask of the CPU path
            from titan_lite.models.llama3.attention import document_mask
            mask = document_mask(torch.arange(32).remainder(16).expand(2, 32))
        total = 0

        def pack(tensor):
            nonlocal total
            if not isinstance(tensor, torch.nn.Parameter) and tensor.data_ptr() != mask_ptr:
                total += tensor.numel() * tensor.element_size()
            return tensor

        mask_ptr = mask.data_ptr() if mask is not None else -1
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attention(x, rope, mask)
        return total

    kv_bytes = 2 * 32 * (64 // 8) * 4  # one head's keys (or values) for the batch, float32
    assert saved_bytes(2) <= saved_bytes(8) - 2 * 6 * kv_bytes
