"""Tensor parallel (Megatron-style) with sequence parallel on the norms, over the ``tp`` mesh dim.

Column-wise q/k/v (with their biases) and w1/w3 split the heads and the FFN width across ranks;
Qwen3's per-head q/k norms run on each rank's heads; row-wise wo and w2
sum the partial outputs and scatter them along the sequence (sequence parallel), where the norms
run on a slice of the tokens. The embedding is split by vocabulary rows and the output projection
by vocabulary columns; with loss parallel the logits stay split and the cross entropy is computed
on the shards (``torch.distributed.tensor.parallel.loss_parallel``).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from titan_lite.models.llama3 import ModelArgs, Transformer


def tp_problems(args: ModelArgs, degree: int) -> list[str]:
    """Why ``args`` cannot be split ``degree`` ways (empty when it can)."""
    problems = []
    for what, size in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads),
                       ("FFN hidden size", args.ffn_hidden_dim)):
        if size % degree:
            problems.append(f"parallelism.tensor_parallel_degree: {degree} does not divide the "
                            f"model's {what} ({size})")
    if args.tie_word_embeddings and degree > 1:
        problems.append("parallelism.tensor_parallel_degree: tied input/output embeddings "
                        "(1B, 3B) are not supported with tensor parallel yet")
    return problems


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """Shard ``model``'s matmuls over ``tp_mesh`` in place (on the meta device, before FSDP)."""
    root_plan = {}
    if model.tok_embeddings is not None:  # absent on later pipeline stages
        root_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(),
                                                      output_layouts=Shard(1))
    if model.norm is not None:  # absent on earlier pipeline stages
        root_plan["norm"] = SequenceParallel()
        root_plan["output"] = ColwiseParallel(
            input_layouts=Shard(1), output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, root_plan)
    for block in model.layers.values():
        if block.attention.q_norm is not None:  # Qwen3: a norm per head, on this rank's heads
            # (as the norms on sequence shards: the weight's gradient is summed over the ranks)
            parallelize_module(block, tp_mesh, {
                name: SequenceParallel(sequence_dim=2, use_local_output=True)
                for name in ("attention.q_norm", "attention.k_norm")})
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            # The rope phases, the attention mask and the KV cache (arguments 2-4) are the same
            # on every rank: leave them plain.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None,
                                                                   None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
