"""A job's architecture: a named flavor, or (``model.flavor = "auto"``) a Hugging Face
folder's config.json (Llama, Mistral, Qwen2 / Qwen2.5, Qwen3), read exactly or refused with the
field it cannot represent; and the check that the tokenizer agrees with that config.json (vocab
size, bos/eos/pad ids)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from titan_lite.config.schema import AUTO_FLAVOR
from titan_lite.data.tokenizer import Tokenizer
from titan_lite.models.llama3 import FAMILIES, FLAVORS, ModelArgs, RopeScaling

# model_type -> the architecture name transformers loads it as
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
assert set(ARCHITECTURES) == set(FAMILIES)
# Keys that, when true, mean weights or norms this model does not have.
_UNSUPPORTED_TRUE = {
    "attention_bias": "a bias on the attention output projection (only q/k/v biases, as "
                      "Qwen2's, are supported)",
    "mlp_bias": "biases in the MLP (this model has none)",
    "qk_norm": "norms on q and k outside Qwen3",
    "use_qk_norm": "norms on q and k outside Qwen3",
}


def read_config_json(folder: str) -> dict:
    """``folder``/config.json as a dict (ValueError naming the file when absent or broken)."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None


def args_from_hf_config(folder: str) -> ModelArgs:
    """ModelArgs of the Llama checkpoint in ``folder`` (its config.json); ValueError naming the
    file and field for anything this model cannot represent exactly."""
    return args_from_config(read_config_json(folder), os.path.join(folder, "config.json"))


def args_from_config(config: dict, path: str) -> ModelArgs:
    """ModelArgs of a config.json already read from ``path`` (see ``args_from_hf_config``)."""
    _refuse_unsupported(config, path)
    try:
        args = _args_from(config)
    except KeyError as e:
        raise ValueError(f"{path}: no {e.args[0]!r}; is it a Llama-family model?") from None
    try:
        args.validate()
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return args


def _refuse_unsupported(config: dict, path: str) -> None:
    """One line for the first thing in ``config`` that is not this model."""
    family = config.get("model_type", "llama")
    if family not in ARCHITECTURES:
        raise ValueError(f"{path}: model_type {family!r}: supported are "
                         f"{', '.join(map(repr, ARCHITECTURES))}")
    architectures = config.get("architectures") or [ARCHITECTURES[family]]
    if ARCHITECTURES[family] not in architectures:
        raise ValueError(f"{path}: architectures {architectures}: only "
                         f"{ARCHITECTURES[family]} (a language-model head) is supported")
    for key, what in _UNSUPPORTED_TRUE.items():
        if config.get(key) and not (family == "qwen3" and key in ("qk_norm", "use_qk_norm")):
            raise ValueError(f"{path}: {key} {json.dumps(config[key])}: {what}")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {config['hidden_act']!r}: this model's MLP is "
                         "SwiGLU ('silu')")
    if config.get("quantization_config"):
        raise ValueError(f"{path}: quantization_config: a pre-quantised checkpoint; give the "
                         "unquantised weights (lora.quantize_base quantises them itself)")
    for key in ("rope_parameters", "rope_scaling"):
        rope = config.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{path}: {key} type {rope_type!r}: only Llama 3.1's 'llama3' "
                             "scaling (or none) is supported")


def sliding_window(config: dict) -> int | None:
    """The attention window the checkpoint was trained with, or None: Mistral's
    ``sliding_window`` (null from v0.2 on); Qwen's only when ``use_sliding_window``."""
    if config.get("model_type") in ("qwen2", "qwen3") and not config.get("use_sliding_window"):
        return None
    return config.get("sliding_window") or None


def _rope(config: dict) -> dict:
    """RoPE settings: transformers >= 5 writes rope_parameters, older versions rope_scaling."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _args_from(config: dict) -> ModelArgs:
    rope = _rope(config)
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        scaling = RopeScaling(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"])
    family = config.get("model_type", "llama")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    return ModelArgs(
        dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        vocab_size=config["vocab_size"], ffn_hidden_size=config["intermediate_size"],
        norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
        rope_scaling=scaling, max_seq_len=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
        head_size=head_dim if head_dim and head_dim * n_heads != dim else None,
        sliding_window=sliding_window(config), family=family)


def architecture_mismatches(expected: ModelArgs, found: ModelArgs) -> list[str]:
    """The fields (other than the context length) in which two architectures differ."""
    fields = {"dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads",
              "kv_heads": "n_kv_heads", "head_dim": "head_dim", "ffn_hidden_dim": "FFN width",
              "vocab_size": "vocab_size", "norm_eps": "norm_eps", "rope_theta": "rope_theta",
              "rope_scaling": "rope_scaling", "tie_word_embeddings": "tie_word_embeddings",
              "qkv_bias": "qkv_bias", "qk_norm": "qk_norm", "family": "model_type"}
    return [f"{label} {getattr(found, name)} (expected {getattr(expected, name)})"
            for name, label in fields.items() if getattr(found, name) != getattr(expected, name)]


def has_config_json(folder: str) -> bool:
    return bool(folder) and os.path.isfile(os.path.join(folder, "config.json"))


def job_model_args(flavor: str, init_from: str, seq_len: int,
                   tokenizer: Tokenizer | None) -> ModelArgs:
    """The model a job builds, trained on ``seq_len`` tokens: ``model.flavor``'s published
    architecture, or (``auto``) the one in ``init_from``'s config.json. When ``init_from`` has
    a config.json (read once), a named flavor must match it, the vocabulary is its own (it may
    pad the tokenizer's; ``check_tokenizer``); else the tokenizer's (None: the flavor's own, for
    the estimator without the tokenizer at hand). ValueError naming the key or file."""
    if not has_config_json(init_from):
        if flavor == AUTO_FLAVOR:
            raise ValueError(_auto_needs_config(init_from))
        args = FLAVORS[flavor]
        args = args if tokenizer is None else args.with_vocab(tokenizer.vocab_size)
        return replace(args, max_seq_len=seq_len)
    path = os.path.join(init_from, "config.json")
    config = read_config_json(init_from)
    found = args_from_config(config, path)
    if found.sliding_window is not None and seq_len > found.sliding_window:
        raise ValueError(f"{path}: sliding_window {found.sliding_window}: training.seq_len "
                         f"{seq_len} is longer, and this model has no windowed attention (up "
                         "to the window it is plain causal attention): set training.seq_len "
                         f"<= {found.sliding_window}")
    if flavor != AUTO_FLAVOR:
        mismatches = architecture_mismatches(FLAVORS[flavor].with_vocab(found.vocab_size), found)
        if mismatches:
            raise ValueError(f"model.init_from: {init_from} is not this model: "
                             f"{'; '.join(mismatches)}")
    if tokenizer is not None:
        check_tokenizer(tokenizer, config, path)
    return replace(found, max_seq_len=seq_len)


def _auto_needs_config(init_from: str) -> str:
    if not init_from:
        return ("model.flavor: 'auto' takes the architecture from model.init_from's "
                "config.json; set model.init_from (or name a flavor)")
    return (f"model.flavor: 'auto' needs {init_from}/config.json (a Hugging Face folder or a "
            "`python -m titan_lite.hf import` checkpoint); name the flavor for a training "
            "checkpoint")


def check_tokenizer(tokenizer: Tokenizer, config: dict, path: str) -> None:
    """The tokenizer must fit the checkpoint: no more tokens than its vocab_size (a padded
    vocabulary may have more rows), and its bos/eos/pad ids where config.json names them."""
    source = tokenizer.files[0]
    vocab = config.get("vocab_size")
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"{path}: vocab_size {vocab} is smaller than the tokenizer's "
                         f"{tokenizer.vocab_size} tokens ({source}): not this model's tokenizer")
    for key, mine in (("bos_token_id", tokenizer.bos_id), ("eos_token_id", tokenizer.eos_id),
                      ("pad_token_id", tokenizer.pad_id)):
        theirs = config.get(key)
        allowed = theirs if isinstance(theirs, list) else [theirs]
        if theirs is not None and mine is not None and mine not in allowed:
            raise ValueError(f"{path}: {key} {theirs} but the tokenizer ({source}) has "
                             f"{mine}: not this model's tokenizer")
