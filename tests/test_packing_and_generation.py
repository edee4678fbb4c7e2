"""Packed samples attend only to themselves; decoding with a KV cache; greedy parity with HF."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from titan_lite.config import Generation
from titan_lite.inference.generation import choose_next, generate
from titan_lite.models.llama3 import ModelArgs, Transformer
from titan_lite.models.llama3.attention import attend, document_mask, sample_ids

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=97, multiple_of=16,
                 max_seq_len=64)
# fp32, the same sums over other key sets (masked keys add exact zeros): rounding level.
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ARGS)
    m.init_weights(seed=0)
    return m.eval()


def test_a_packed_row_gives_each_sample_the_logits_it_has_alone(model):
    lengths = [9, 20, 3, 32]  # fills the row of 64
    samples = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n))
               for n in lengths]
    row = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = model(row, positions=positions)[0]
        causal = model(row)[0]
        start = 0
        for sample in samples:
            alone = model(sample[None])[0]
            torch.testing.assert_close(packed[start:start + len(sample)], alone, rtol=0,
                                       atol=ATOL)
            start += len(sample)
    # without positions the later samples see the earlier ones (pretraining packing)
    assert not torch.allclose(causal[9:29], packed[9:29], atol=1e-3)


def test_flex_attention_block_mask_equals_the_boolean_mask_sdpa_takes():
    """CUDA uses a FlexAttention BlockMask, CPU a boolean mask: the same attention."""
    positions = torch.cat([torch.arange(40), torch.arange(50), torch.arange(38)])[None]
    positions = positions.expand(2, -1)
    ids = sample_ids(positions)
    block_mask = create_block_mask(lambda b, h, q, k: (ids[b, q] == ids[b, k]) & (k <= q),
                                   2, None, 128, 128, device="cpu")
    q, k, v = (torch.randn(2, 4, 128, 16, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    torch.testing.assert_close(attend(q, k, v, block_mask), attend(q, k, v,
                                                                   document_mask(positions)),
                               rtol=0, atol=ATOL)


def test_kv_cache_decoding_equals_rerunning_the_prefix(model):
    prompt = [5, 17, 33, 2, 64, 11]
    sampled = Generation(max_new_tokens=30, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    for cfg in (Generation(max_new_tokens=30), sampled):
        cached = generate(model, prompt, cfg, stop_ids=set(), device=torch.device("cpu"))
        plain = generate(model, prompt, cfg, set(), torch.device("cpu"), use_cache=False)
        assert cached.ids == plain.ids and len(cached.ids) == 30
    # stops at a stop id, and never runs past max_seq_len
    greedy = generate(model, prompt, Generation(max_new_tokens=30), set(), torch.device("cpu"))
    stop = greedy.ids[4]
    first = greedy.ids.index(stop)
    assert generate(model, prompt, Generation(max_new_tokens=30), {stop},
                    torch.device("cpu")).ids == greedy.ids[:first]
    assert len(generate(model, prompt, Generation(max_new_tokens=500), set(),
                        torch.device("cpu")).ids) == 64 - len(prompt)


def test_sampling_respects_top_k_and_top_p_and_its_seed():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    draws = {choose_next(logits, Generation(temperature=1.0, top_k=2, seed=s),
                         torch.Generator().manual_seed(s)) for s in range(200)}
    assert draws == {0, 1}
    # p(0) = 0.64, p(1) = 0.24: the nucleus of 0.8 holds tokens 0 and 1
    draws = {choose_next(logits, Generation(temperature=1.0, top_p=0.8),
                         torch.Generator().manual_seed(s)) for s in range(200)}
    assert draws == {0, 1}
    assert choose_next(logits, Generation(), torch.Generator()) == 0
    again = [choose_next(logits, Generation(temperature=2.0), torch.Generator().manual_seed(7))
             for _ in range(2)]
    assert again[0] == again[1]


def test_greedy_decoding_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=101, max_position_embeddings=128, rope_theta=500000.0,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    from test_hf import load  # the HF-folder loader of the import tests

    ours = load(tmp_path)
    prompt = [3, 14, 15, 92, 65, 35]
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    got = generate(ours.eval(), prompt, Generation(max_new_tokens=40), set(),
                   torch.device("cpu"))
    assert got.ids == expected


def test_batched_generation_equals_one_prompt_at_a_time(model):
    """Prompts of very different lengths, left-padded into one batch with one KV cache: each
    row's greedy tokens are those of its prompt alone, rows stopping (stop id, max_new_tokens,
    the model's max_seq_len) at different steps and leaving the batch."""
    from titan_lite.inference.generation import generate_batch

    rng = torch.Generator().manual_seed(1)
    cpu = torch.device("cpu")
    prompts = [torch.randint(3, ARGS.vocab_size, (n,), generator=rng).tolist()
               for n in (1, 17, 5, 40, ARGS.max_seq_len - 8, 2)]
    cfg = Generation(max_new_tokens=24)
    alone = [generate(model, p, cfg, set(), cpu).ids for p in prompts]
    assert [out.ids for out in generate_batch(model, prompts, cfg, set(), cpu)] == alone
    assert [len(ids) for ids in alone] == [24, 24, 24, 24, 8, 24]  # row 4: max_seq_len
    stop = alone[2][5]  # a token prompt 2 emits: rows stop on it at different steps
    alone = [generate(model, p, cfg, {stop}, cpu).ids for p in prompts]
    assert [out.ids for out in generate_batch(model, prompts, cfg, {stop}, cpu)] == alone
    assert len({len(ids) for ids in alone}) > 2
    sampled = Generation(max_new_tokens=12, temperature=0.8, top_k=50, seed=3)
    assert [out.ids for out in generate_batch(model, prompts, sampled, set(), cpu)] == [
        generate(model, p, sampled, set(), cpu).ids for p in prompts]
