"""LoRA and QLoRA in one process: adapters start as a no-op, merge exactly, match peft's
gradients and export to it; NF4 has the format's error and size; bad [lora] keys are refused."""

import math
from dataclasses import replace

import pytest
import torch
from test_hf import TOKENS, hf_folder  # noqa: F401 - the fixture is used by name

from titan_lite.build import check_job
from titan_lite.config import load_config
from titan_lite.finetune import (
    FrozenLinear,
    LoRALinear,
    adapter_parameters,
    apply_lora,
    is_adapter,
    merge_adapters,
    quantize_block_linears,
)
from titan_lite.finetune.lora import block_linears
from titan_lite.finetune.nf4 import BYTES_PER_WEIGHT, dequantized, device_copy
from titan_lite.hf import args_from_hf_config, load_hf_weights, save_peft, to_hf_rows
from titan_lite.loss import cross_entropy_sum
from titan_lite.runtime.memory import tensor_bytes
from titan_lite.models.llama3 import FLAVORS, Transformer
from titan_lite.optim import build_optimizer
from titan_lite.parallel.init import materialize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("torchao")

ARGS = replace(FLAVORS["debugmodel"], vocab_size=300, max_seq_len=32)
CPU = torch.device("cpu")
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"]


def lora_model(args=ARGS, base_dtype=torch.float32, quantize=False, targets=ALL, rank=4,
               alpha=8.0, seed=0, on_host=False) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    apply_lora(model, rank, alpha, 0.0, targets, base_dtype)
    if quantize:
        quantize_block_linears(model, CPU, on_host)
    materialize(model, seed, CPU, CPU)
    return model


def plain_model(args=ARGS, seed=0) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    materialize(model, seed, CPU, CPU)
    return model


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def tokens(vocab: int = ARGS.vocab_size) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(3))


def test_zero_initialised_adapters_give_the_base_logits_exactly():
    lora, base = lora_model(), plain_model()
    assert all(torch.count_nonzero(p) == 0 for n, p in adapter_parameters(lora)
               if n.endswith("lora_b.weight"))
    assert all(torch.count_nonzero(p) > 0 for n, p in adapter_parameters(lora)
               if n.endswith("lora_a.weight"))
    with torch.no_grad():
        assert torch.equal(lora(tokens()), base(tokens()))


def test_merged_adapters_give_the_unmerged_logits():
    lora = lora_model()
    randomize_adapters(lora)
    merged = merge_adapters({n: p.detach() for n, p in lora.named_parameters()},
                            scale=8.0 / 4)
    base = plain_model()
    base.load_state_dict(merged)
    with torch.no_grad():
        unmerged = lora(tokens())
        assert not torch.allclose(unmerged, plain_model()(tokens()), atol=1e-3)  # it matters
        torch.testing.assert_close(base(tokens()), unmerged, rtol=0, atol=1e-5)


def test_base_gets_no_gradient_and_no_optimizer_state():
    lora = lora_model(base_dtype=torch.bfloat16)
    optimizer = build_optimizer(lora, load_config([]).optimizer)
    cross_entropy_sum(lora(tokens()), tokens()).backward()
    optimizer.step()
    for name, p in lora.named_parameters():
        assert (p.grad is not None) == is_adapter(name), name
        assert (p in optimizer.state) == is_adapter(name), name
        assert p.dtype == (torch.float32 if is_adapter(name) else torch.bfloat16), name


def _peft_model(folder, adapters):
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, adapters, is_trainable=True).train()


def test_adapter_gradients_and_peft_export_match_peft_on_transformers(hf_folder, tmp_path):  # noqa: F811
    """The same base (a transformers Llama) and adapters (exported to a PEFT folder): equal
    logits, and equal adapter gradients of the summed cross entropy."""
    args = args_from_hf_config(str(hf_folder))
    lora = lora_model(args)
    load_hf_weights([lora], str(hf_folder), args)
    randomize_adapters(lora)
    save_peft(lora, args, str(tmp_path / "adapter"))
    theirs = _peft_model(hf_folder, str(tmp_path / "adapter"))
    ours_logits, their_logits = lora(TOKENS), theirs(TOKENS).logits
    torch.testing.assert_close(ours_logits, their_logits, rtol=0, atol=1e-4)
    cross_entropy_sum(ours_logits, TOKENS).backward()
    cross_entropy_sum(their_logits, TOKENS).backward()
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(their_grads) == sum(1 for _ in adapter_parameters(lora))
    hf_names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                "feed_forward.w2": "mlp.down_proj"}
    for name, p in adapter_parameters(lora):
        linear, kind = name.rsplit(".", 2)[:2]
        if linear == "output":
            hf = "base_model.model.lm_head"
        else:
            layer, path = linear.split(".", 2)[1:]
            hf = f"base_model.model.model.layers.{layer}.{hf_names[path]}"
        grad = p.grad
        heads = {"attention.wq": args.n_heads, "attention.wk": args.kv_heads}.get(
            linear.split(".", 2)[-1])
        if kind == "lora_b" and heads:
            grad = to_hf_rows(grad, heads)
        theirs_grad = their_grads[f"{hf}.{'lora_A' if kind == 'lora_a' else 'lora_B'}.default"
                                  ".weight"]
        torch.testing.assert_close(grad, theirs_grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


# The 16 NF4 levels of the QLoRA paper (quantiles of N(0, 1), normalised to [-1, 1]).
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def reference_nf4(weight: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Absmax per block of 64, nearest NF4 level, back: the format without its scale
    quantisation."""
    blocks = weight.reshape(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    nearest = (blocks / scale).unsqueeze(-1).sub(NF4_LEVELS).abs().argmin(-1)
    return (NF4_LEVELS[nearest] * scale).reshape(weight.shape)


def test_nf4_round_trip_has_the_formats_error_and_size():
    from titan_lite.finetune.nf4 import _to_nf4

    weight = torch.randn(1024, 512, generator=torch.Generator().manual_seed(0))
    quantized = _to_nf4()(weight, 64, 256)
    relative = ((dequantized(quantized) - weight).norm() / weight.norm()).item()
    expected = ((reference_nf4(weight) - weight).norm() / weight.norm()).item()
    assert 0.05 < expected < 0.15
    # double-quantised scales (int8) add a little to the paper's error, never much
    assert expected <= relative < expected * 1.05
    assert tensor_bytes(quantized) / weight.numel() == pytest.approx(BYTES_PER_WEIGHT, rel=1e-3)
    assert BYTES_PER_WEIGHT < 0.52


def test_nf4_dequantised_in_slices_equals_it_whole():
    from titan_lite.finetune.nf4 import quantize_linears, write_quantized

    linear = FrozenLinear(256, 512, torch.bfloat16)
    quantize_linears([linear], CPU)
    write_quantized(linear.weight, torch.randn(512, 256, generator=torch.Generator()
                                                 .manual_seed(0)).bfloat16())
    whole = linear.weight.get_original_weight()
    torch.testing.assert_close(dequantized(linear.weight, rows_per_slice=64), whole,
                               rtol=0, atol=0)
    x = torch.randn(3, 256, dtype=torch.bfloat16, requires_grad=True)
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, whole), rtol=0, atol=0)


def test_qlora_forward_equals_lora_on_the_dequantised_weights():
    qlora = lora_model(base_dtype=torch.bfloat16, quantize=True)
    randomize_adapters(qlora)
    assert sum(tensor_bytes(p) for _, p in qlora.named_parameters()) < 0.6 * sum(
        tensor_bytes(p) for _, p in lora_model(base_dtype=torch.bfloat16).named_parameters())
    lora = lora_model(base_dtype=torch.float32)
    with torch.no_grad():
        for (name, mine), (_, theirs) in zip(lora.named_parameters(),
                                             qlora.named_parameters()):
            mine.copy_(dequantized(theirs).float())
    logits = qlora(tokens())
    torch.testing.assert_close(logits, lora(tokens()), rtol=0, atol=1e-5)
    cross_entropy_sum(logits, tokens()).backward()  # backward dequantises too
    assert all(p.grad is not None for _, p in adapter_parameters(qlora))
    assert isinstance(qlora.layers["0"].attention.wq, LoRALinear)


def test_streamed_nf4_linears_copy_their_weight_per_use_and_keep_no_copy(monkeypatch):
    """QLoRA on one GPU under CPU offload: each block linear's NF4 weight stays in host memory
    and is copied to the input's device in forward and again in backward (on a CPU, a copy on
    the same device); the results are those of the weight used in place, bit for bit, and what
    forward keeps for backward holds no copy."""
    import titan_lite.finetune.lora as lora_module
    from titan_lite.finetune import host_parameters
    from titan_lite.runtime.memory import TensorMemoryTracker

    copies = []

    def counted_copy(tensor, device):
        copies.append(tensor)
        return device_copy(tensor, device)

    monkeypatch.setattr(lora_module, "device_copy", counted_copy)
    models = [lora_model(base_dtype=torch.bfloat16, quantize=True, on_host=on_host)
              for on_host in (False, True)]
    kept_forward = []
    for model in models:
        randomize_adapters(model)
        with torch.no_grad():
            model(tokens())  # (one-time allocations outside the count)
        tracker = TensorMemoryTracker()
        tracker.track(model.parameters())
        weights = tracker.live_bytes
        with tracker:
            loss = cross_entropy_sum(model(tokens()), tokens())
            kept_forward.append(tracker.live_bytes - weights)
            loss.backward()
    in_place, streamed = models
    linears = len(list(block_linears([streamed])))
    assert set(host_parameters(streamed)) == {f"{name}.weight" for name, _ in
                                             block_linears([streamed])}
    # each weight once in the untracked forward and the forward, and again in backward but
    # the first block's q, k and v:
    # their input (the frozen embedding's output) needs no gradient
    assert len(copies) == 3 * linears - 3
    assert kept_forward[1] == kept_forward[0]  # forward keeps the host weight, not a copy
    for (name, mine), (_, theirs) in zip(adapter_parameters(streamed),
                                         adapter_parameters(in_place)):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("overrides, key", [
    (["--lora.rank", "0"], "lora.rank"),
    (["--lora.alpha", "0"], "lora.alpha"),
    (["--lora.target_modules", "wq,q_proj"], "lora.target_modules"),
    (["--parallelism.tensor_parallel_degree", "2"], "lora.enable"),
    (["--parallelism.pipeline_parallel_degree", "2"], "lora.enable"),
    (["--lora.quantize_base", "nf4", "--lora.save_base", "true"], "lora.save_base"),
    (["--lora.embedding_on_host", "true", "--model.flavor", "1B"], "lora.embedding_on_host"),
])
def test_bad_lora_keys_are_refused_naming_the_key(repo_cwd, overrides, key):
    from titan_lite.config import ConfigError

    try:
        cfg = load_config(["--lora.enable", "true", *overrides])
    except ConfigError as e:
        problems = e.problems
    else:
        problems = check_job(cfg, 2)
    assert any(p.split(":")[0].lstrip("-") == key for p in problems), problems


def test_quantize_base_without_torchao_names_the_install_command(repo_cwd, monkeypatch):
    import titan_lite.build.checks as checks

    monkeypatch.setattr(checks, "nf4_available", lambda: False)
    problems = check_job(load_config(["--lora.enable", "true", "--lora.quantize_base", "nf4"]),
                         1)
    assert any("pip install -e '.[qlora]'" in p and p.startswith("lora.quantize_base:")
               for p in problems), problems


def test_lora_modules_are_built_where_the_model_is():
    """On the meta device, so that materialising places every weight (adapters, frozen output)
    on the training device instead of leaving real host tensors behind."""
    with torch.device("meta"):
        model = Transformer(ARGS)
    apply_lora(model, 4, 8.0, 0.0, ALL, torch.bfloat16)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_flops_count_no_weight_gradients_for_the_frozen_base():
    full = plain_model().flops_per_token(32)
    lora = lora_model(targets=[])  # nothing trained: forward + input gradients only
    attention = 12 * ARGS.n_layers * ARGS.n_heads * ARGS.head_dim * 32
    assert math.isclose(lora.flops_per_token(32) - attention, (full - attention) * 4 / 6)


def test_bf16_compute_keeps_the_residual_stream_in_bf16_and_trains_float32_adapters():
    with torch.device("meta"):
        model = Transformer(ARGS)
    apply_lora(model, 4, 8.0, 0.0, ALL, torch.bfloat16, compute_dtype=torch.bfloat16)
    materialize(model, 0, CPU, CPU)
    randomize_adapters(model)
    dtypes = []
    model.layers["0"].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens())
    assert dtypes == [torch.bfloat16] and torch.isfinite(logits.float()).all()
    cross_entropy_sum(logits, tokens()).backward()
    for name, p in adapter_parameters(model):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
    with torch.no_grad():  # without autocast, as generation runs: the adapters cast for themselves
        torch.testing.assert_close(model(tokens()).float(), logits.float(), rtol=0, atol=0.1)
