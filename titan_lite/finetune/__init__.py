"""Fine-tuning transforms applied to a built model from outside it: LoRA adapters on a frozen
base (``lora``) and the base's 4-bit NF4 storage for QLoRA (``nf4``)."""

from __future__ import annotations

from titan_lite.finetune.base import base_fingerprint, describe_parameters
from titan_lite.finetune.lora import (
    FrozenLinear,
    LoRALinear,
    adapter_parameters,
    apply_lora,
    base_parameters,
    host_parameters,
    is_adapter,
    merge_adapters,
    place_on_host,
    quantize_block_linears,
)
from titan_lite.finetune.nf4 import is_quantized, nf4_available

__all__ = [
    "FrozenLinear", "LoRALinear", "adapter_parameters", "apply_lora", "base_fingerprint",
    "base_parameters", "describe_parameters", "host_parameters", "is_adapter", "is_quantized",
    "merge_adapters", "nf4_available", "place_on_host", "quantize_block_linears",
]
