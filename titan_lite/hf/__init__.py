"""Hugging Face Llama-family checkpoints (Llama, Mistral, Qwen2 / Qwen2.5, Qwen3).

``config``: their config.json to and from ``ModelArgs``; ``weights``: their safetensors loaded
into any layout and a model written back in their layout; ``__main__``: the ``python -m
titan_lite.hf import|export`` commands between their folders and titan_lite checkpoints.
"""

from titan_lite.hf.config import args_from_hf_config, has_config_json, job_model_args
from titan_lite.hf.weights import (
    from_hf_rows,
    hf_config,
    load_hf_weights,
    save_hf,
    save_peft,
    to_hf_rows,
)

__all__ = ["args_from_hf_config", "from_hf_rows", "has_config_json", "hf_config",
           "job_model_args", "load_hf_weights", "save_hf", "save_peft", "to_hf_rows"]
