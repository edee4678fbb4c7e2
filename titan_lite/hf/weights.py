"""Hugging Face Llama-family weights (Llama, Mistral, Qwen2 / Qwen2.5, Qwen3): load their
safetensors into any layout, write a model back in their layout (and a PEFT adapter folder).

Meta's checkpoints (and this model) rotate consecutive pairs of each head's q/k features; Hugging
Face's models rotate the two halves of each head, so its conversion script permutes the rows of
q_proj and k_proj within every head. Loading undoes that permutation and writing redoes it, for
everything indexed by those rows: the weights, Qwen2's q/k biases, and (within one head) Qwen3's
q/k norm weights. Every other tensor only changes its name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from titan_lite.finetune.lora import LoRALinear, base_parameters
from titan_lite.finetune.nf4 import is_quantized, write_quantized
from titan_lite.hf.config import ARCHITECTURES
from titan_lite.models.llama3 import ModelArgs
from titan_lite.parallel.init import local_offset

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
              "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """The Hugging Face name of one of this model's parameters."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def _rotary_heads(name: str, args: ModelArgs) -> int:
    """Heads whose rows Hugging Face permutes in this parameter (0: not permuted)."""
    if re.search(r"attention\.wq\.(weight|bias)$", name):
        return args.n_heads
    if re.search(r"attention\.wk\.(weight|bias)$", name):
        return args.kv_heads
    if re.search(r"attention\.[qk]_norm\.weight$", name):
        return 1  # one head's features
    return 0


def to_hf_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved-pair order of whole heads' rows -> Hugging Face's half-split order."""
    head_dim = rows.shape[0] // heads
    return rows.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(rows.shape)


def from_hf_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's half-split order of whole heads' rows -> Meta's interleaved pairs."""
    head_dim = rows.shape[0] // heads
    return rows.view(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(rows.shape)


class SafetensorsFolder:
    """Tensors by name from one or many .safetensors files (with model.safetensors.index.json)."""

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as fh:
                files = json.load(fh)["weight_map"]
            self.file_of = {name: os.path.join(folder, f) for name, f in files.items()}
        else:
            single = os.path.join(folder, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"{folder}: no model.safetensors or "
                                        "model.safetensors.index.json")
            with safe_open(single, "pt") as f:
                self.file_of = {name: single for name in f.keys()}
        self.folder = folder

    def _file(self, name: str) -> str:
        if name not in self.file_of:
            raise ValueError(f"{self.folder}: tensor {name!r} is missing: not this model's "
                             "checkpoint")
        return self.file_of[name]

    def shape(self, name: str) -> list[int]:
        with safe_open(self._file(name), "pt") as f:
            return list(f.get_slice(name).get_shape())

    def rows(self, name: str, start: int, stop: int, columns: slice) -> torch.Tensor:
        with safe_open(self._file(name), "pt") as f:
            tensor = f.get_slice(name)
            if len(tensor.get_shape()) == 1:
                return tensor[start:stop]
            return tensor[start:stop, columns]


@torch.no_grad()
def load_hf_weights(model_parts: Iterable[nn.Module], folder: str, args: ModelArgs) -> None:
    """Copy the checkpoint in ``folder`` into the (possibly sharded) parameters in place.

    Each rank reads only the rows and columns of its own shards (plus, for q/k, the rest of the
    heads its rows fall in), so no rank ever holds a full copy of the model.
    """
    source = SafetensorsFolder(folder)
    for part in model_parts:
        for name, param in base_parameters(part):  # LoRA adapters are not in the folder
            stored = source.shape(hf_name(name))
            if stored != list(param.shape):
                raise ValueError(f"{folder}: {hf_name(name)} has shape {stored} where this "
                                 f"job's model has {list(param.shape)}: not this model's "
                                 "checkpoint")
            local, offset = param, [0] * param.ndim
            if isinstance(param, DTensor):
                local, offset = param.to_local(), local_offset(param)
            if local.numel() == 0:
                continue
            if is_quantized(local):  # NF4 quantises the whole weight (see write_quantized)
                full = read_hf_tensor(source, name, args, param.shape, [0] * param.ndim)
                write_quantized(local, full, offset[0])
            else:
                local.copy_(read_hf_tensor(source, name, args, local.shape, offset))


def read_hf_tensor(source: SafetensorsFolder, name: str, args: ModelArgs, shape: torch.Size,
                   offset: list[int]) -> torch.Tensor:
    """The block of titan_lite tensor ``name`` of ``shape`` at ``offset`` (a shard, or the
    whole tensor at zeros), read from the Hugging Face folder with q/k rows un-permuted."""
    start, stop = offset[0], offset[0] + shape[0]
    columns = slice(offset[1], offset[1] + shape[1]) if len(shape) == 2 else slice(None)
    heads = _rotary_heads(name, args)
    if not heads:
        return source.rows(hf_name(name), start, stop, columns)
    head_dim = args.head_dim  # permuted in whole heads: read the heads the rows fall in
    first, last = start // head_dim, -(-stop // head_dim)
    rows = source.rows(hf_name(name), first * head_dim, last * head_dim, columns)
    rows = from_hf_rows(rows, last - first)
    return rows[start - first * head_dim: stop - first * head_dim]


def hf_config(args: ModelArgs, dtype: torch.dtype = torch.float32) -> dict:
    """config.json for transformers' model of this architecture's family (``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``)."""
    config = {
        "architectures": [ARCHITECTURES[args.family]], "model_type": args.family,
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "hidden_act": "silu",
        "tie_word_embeddings": args.tie_word_embeddings, "rope_theta": args.rope_theta,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if args.family in ("llama", "qwen3"):
        config.update(attention_bias=False)
    if args.family == "llama":
        config.update(mlp_bias=False)
    if args.family == "mistral":
        config.update(sliding_window=args.sliding_window)
    if args.family in ("qwen2", "qwen3"):
        config.update(use_sliding_window=args.sliding_window is not None,
                      sliding_window=args.sliding_window, max_window_layers=args.n_layers)
    if args.rope_scaling is not None:
        s = args.rope_scaling
        config["rope_scaling"] = {
            "rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
    return config


def hf_tensors(state_dict: dict[str, torch.Tensor], args: ModelArgs
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) for a full (unsharded) state dict of this model."""
    for name, tensor in state_dict.items():
        heads = _rotary_heads(name, args)
        yield hf_name(name), (to_hf_rows(tensor, heads) if heads else tensor).contiguous()


def save_peft(model: nn.Module, args: ModelArgs, folder: str, base_model: str = "") -> None:
    """Write ``model``'s LoRA adapters as a PEFT adapter folder (adapter_config.json +
    adapter_model.safetensors) that ``peft.PeftModel.from_pretrained`` puts on
    ``LlamaForCausalLM``. B's rows of q/k are permuted as their weights are (A's columns
    follow the input features, which are not)."""
    tensors, targets, adapter = {}, set(), None
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        adapter = module
        hf_linear = hf_name(f"{name}.weight").removesuffix(".weight")
        targets.add(hf_linear.rsplit(".", 1)[-1])
        heads = _rotary_heads(f"{name}.weight", args)
        lora_b = module.lora_b.weight.detach().float()
        prefix = f"base_model.model.{hf_linear}"
        tensors[f"{prefix}.lora_A.weight"] = module.lora_a.weight.detach().float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (to_hf_rows(lora_b, heads) if heads
                                              else lora_b).contiguous()
    if adapter is None:
        raise ValueError("the model has no LoRA adapters to export")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank,
              "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout_p, "bias": "none",
              "target_modules": sorted(targets), "fan_in_fan_out": False,
              "inference_mode": True, "use_rslora": False, "init_lora_weights": True,
              "base_model_name_or_path": base_model}
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)


def save_hf(state_dict: dict[str, torch.Tensor], args: ModelArgs, folder: str,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``folder`` as ``LlamaForCausalLM.from_pretrained`` reads it: config.json,
    model-0000i-of-0000n.safetensors files of at most ``max_shard_bytes``, and their index."""
    os.makedirs(folder, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in hf_tensors(state_dict, args):
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, filename), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = filename
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    dtype = next(iter(state_dict.values())).dtype
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(hf_config(args, dtype), fh, indent=2)
