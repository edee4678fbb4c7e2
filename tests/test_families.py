"""Qwen2 / Qwen2.5, Qwen3 and Mistral as switches of the one Llama model, against transformers'
own Qwen2ForCausalLM, Qwen3ForCausalLM and MistralForCausalLM on tiny random models: import
with equal logits, export back with equal logits, the published flavors' parameter counts, and
a config.json field the model cannot represent refused by name."""

import json

import pytest
import torch
from test_hf import LOGITS_ATOL, load

from titan_lite.hf import hf_config, save_hf
from titan_lite.hf.config import args_from_hf_config, job_model_args
from titan_lite.models.llama3 import FLAVORS, Transformer

transformers = pytest.importorskip("transformers")

VOCAB = 160
COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
              rms_norm_eps=1e-6, rope_theta=1e6)
# family: (config class, model class, extra config); Qwen3's head_dim 24 is not 64 / 4
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=64,
                                                            tie_word_embeddings=False)),
}
TOKENS = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))


def make_hf_model(family: str, folder, seed: int = 0, **overrides):
    """A tiny random ``family`` model saved to ``folder``; biases and norm weights random too
    (their permutation on import must show in the logits)."""
    config_class, model_class, extra = FAMILIES[family]
    config = getattr(transformers, config_class)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, folder)
    return request.param, folder


def _hf_logits(family: str, folder) -> torch.Tensor:
    model_class = getattr(transformers, FAMILIES[family][1])
    model = model_class.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def test_config_switches(family_folder):
    family, folder = family_folder
    args = args_from_hf_config(str(folder))
    assert args.family == family
    assert args.qkv_bias == (family == "qwen2") and args.qk_norm == (family == "qwen3")
    assert args.head_dim == (24 if family == "qwen3" else 16)
    assert args.tie_word_embeddings == (family == "qwen2")
    assert args.sliding_window == (64 if family == "mistral" else None)


def test_imported_model_gives_transformers_logits(family_folder):
    family, folder = family_folder
    with torch.no_grad():
        ours = load(folder)(TOKENS)
    torch.testing.assert_close(ours, _hf_logits(family, folder), rtol=0, atol=LOGITS_ATOL)


def test_export_loads_in_transformers_with_the_same_logits(family_folder, tmp_path):
    family, folder = family_folder
    model = load(folder)
    save_hf(model.state_dict(), model.args, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    assert config["architectures"] == [FAMILIES[family][1]]
    torch.testing.assert_close(_hf_logits(family, tmp_path), _hf_logits(family, folder),
                               rtol=0, atol=LOGITS_ATOL)


def test_sliding_window_is_refused_above_the_window(tmp_path):
    make_hf_model("mistral", tmp_path)
    assert job_model_args("auto", str(tmp_path), 64, None).max_seq_len == 64
    with pytest.raises(ValueError, match="sliding_window 64: training.seq_len 65"):
        job_model_args("auto", str(tmp_path), 65, None)


@pytest.mark.parametrize("field, value, message", [
    ("attention_bias", True, "attention output projection"),
    ("mlp_bias", True, "biases in the MLP"),
    ("model_type", "gemma", "model_type 'gemma'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "type 'yarn'"),
])
def test_a_field_the_model_cannot_represent_is_named(tmp_path, field, value, message):
    make_hf_model("qwen3", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: {field}.*{message}|{message}"):
        args_from_hf_config(str(tmp_path))


# Published sizes (model cards): total and non-embedding parameters, in billions, to the
# precision the card gives them
PUBLISHED = {"qwen2.5_0.5B": (0.49, 0.36, 0.01), "qwen2.5_1.5B": (1.54, 1.31, 0.01),
             "qwen2.5_7B": (7.61, 6.53, 0.01), "qwen3_0.6B": (0.6, 0.44, 0.05),
             "qwen3_8B": (8.2, 6.95, 0.05), "mistral_7B": (7.25, None, 0.01)}


@pytest.mark.parametrize("flavor", sorted(PUBLISHED))
def test_named_flavors_have_the_published_parameter_counts(flavor):
    with torch.device("meta"):
        model = Transformer(FLAVORS[flavor])
    total = model.num_params()
    embeddings = model.tok_embeddings.weight.numel() * (1 if model.output is None else 2)
    expected_total, expected_body, precision = PUBLISHED[flavor]
    assert total / 1e9 == pytest.approx(expected_total, abs=precision)
    if expected_body is not None:
        assert (total - embeddings) / 1e9 == pytest.approx(expected_body, abs=0.01)
    assert hf_config(FLAVORS[flavor])["model_type"] == FLAVORS[flavor].family


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_lora_and_qlora_keep_the_families_biases_and_norms(family_folder, quantize, tmp_path):
    """A LoRA model of the checkpoint (untrained adapters, float32 base) gives transformers'
    logits: its frozen linears keep Qwen2's biases, its frozen norms Qwen3's q/k norms. QLoRA
    quantises the weights only: the biases stay exact."""
    from titan_lite.build import build_finetuned_model
    from titan_lite.config import load_config
    from titan_lite.finetune.nf4 import is_quantized

    family, folder = family_folder
    if quantize == "nf4":  # NF4 needs whole 16,384-weight scale blocks
        folder = tmp_path
        make_hf_model(family, folder, hidden_size=256, intermediate_size=256,
                      **({"head_dim": 128} if family == "qwen3" else {}))
    cfg = load_config(["--model.flavor", "auto", "--model.init_from", str(folder),
                       "--lora.enable", "true", "--lora.base_dtype", "float32",
                       "--lora.quantize_base", quantize, "--training.seq_len", "64"])
    args = job_model_args("auto", str(folder), 64, None)
    model = build_finetuned_model(cfg, args, torch.device("cpu"), None)
    plain = load(folder)
    for name, p in plain.named_parameters():
        if name.endswith("bias") or "_norm" in name:
            torch.testing.assert_close(model.get_parameter(name), p, rtol=0, atol=0)
    linears = [m for m in model.modules() if hasattr(m, "lora_a")]
    assert linears and all(is_quantized(m.weight) == (quantize == "nf4") for m in linears)
    if quantize == "none":
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), _hf_logits(family, folder), rtol=0,
                                       atol=LOGITS_ATOL)
