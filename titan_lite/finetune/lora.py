"""LoRA: trainable low-rank adapters beside frozen weights (Hu et al., 2021).

``apply_lora`` turns a built (meta-device) Llama into a fine-tuning model from the outside: the
targeted linears become ``LoRALinear`` (frozen weight W plus adapters A: r x in, B: out x r, so
y = W x + (alpha / r) B A dropout(x)); every other weight is frozen in place, in
``lora.base_dtype``. Only the adapters are trained, in float32. B starts at zero, so step 0
computes exactly the base model. Parameter names of the base do not change (``layers.0.attention
.wq.weight``), so Hugging Face and titan_lite weights load into it as into the plain model; the
adapters are ``<linear>.lora_a.weight`` and ``<linear>.lora_b.weight``.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from titan_lite.finetune.nf4 import device_copy, dequantized, is_quantized, quantize_linears
from titan_lite.models.llama3 import Transformer
from titan_lite.models.llama3.model import RMSNorm

_ADAPTER = re.compile(r"(.+)\.lora_[ab]\.weight")


class _FrozenLinearFunction(torch.autograd.Function):
    """x @ W^T for a frozen W stored in another dtype than x, quantised (NF4), or in host
    memory (``on_host``: copied to x's device in forward and again in backward). Saves W itself
    for backward (not the input, W needs no gradient, nor a cast, dequantised or device copy of
    W: that would keep a second copy of every frozen weight alive until backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor,  # type: ignore[override]
                on_host: bool) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.on_host = on_host
        dense = dequantized(device_copy(weight, x.device) if on_host else weight)
        if torch.is_autocast_enabled(x.device.type):  # autocast casts both operands itself
            return F.linear(x, dense)
        return F.linear(x, dense.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor  # type: ignore[override]
                 ) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        if ctx.on_host:
            weight = device_copy(weight, grad.device)
        return grad @ dequantized(weight).to(grad.dtype), None, None  # autograd casts to x's


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, on_host: bool = False
                  ) -> torch.Tensor:
    """Linear map by a frozen weight: a plain tensor of any float dtype, or a quantised tensor
    (NF4), dequantised slice by slice in forward and again in backward; ``on_host``: the weight
    is in host memory and is copied to ``x``'s device each time (one weight there at a time)."""
    if not on_host and not is_quantized(weight) and weight.dtype == x.dtype:
        return F.linear(x, weight)
    return _FrozenLinearFunction.apply(x, weight, on_host)


class FrozenLinear(nn.Module):
    """A linear layer whose weight (and bias, if any: Qwen2's q/k/v) is frozen and stored in
    ``dtype`` (the weight may be replaced by a quantised tensor; the bias is never quantised);
    it computes in its input's dtype. ``on_host``: the weight stays in host memory and is
    copied to the input's device where it is used (see ``quantize_block_linears``)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype),
                                 requires_grad=False) if bias else None
        self.on_host = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = frozen_linear(x, self.weight, self.on_host)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class LoRALinear(FrozenLinear):
    """A frozen linear layer plus a trainable float32 low-rank update (alpha / rank) B A."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, rank: int,
                 alpha: float, dropout: float, bias: bool = False):
        super().__init__(in_features, out_features, dtype, bias)
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        self.scale = alpha / rank
        self.lora_a = nn.Linear(in_features, rank, bias=False, dtype=torch.float32)
        self.lora_b = nn.Linear(rank, out_features, bias=False, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, adapter_dtype = self.dropout(x), self.lora_a.weight.dtype
        if inputs.dtype == adapter_dtype or torch.is_autocast_enabled(x.device.type):
            return super().forward(x) + self.lora_b(self.lora_a(inputs)) * self.scale
        # Hidden states in another dtype without autocast (generating from a job that trained
        # in bf16): the adapters compute in their own dtype.
        update = self.lora_b(self.lora_a(inputs.to(adapter_dtype))) * self.scale
        return super().forward(x) + update.to(x.dtype)

    @torch.no_grad()
    def init_adapter_weights(self) -> None:
        """A as nn.Linear initialises (Kaiming-uniform, as peft does), B zero: no change yet."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)


class FrozenEmbedding(nn.Embedding):
    """A frozen embedding table that hands its hidden states on in the training's compute
    dtype, whatever dtype it is stored in: float32 when computing in float32; bfloat16 under
    bf16 mixed precision, so that the residual stream and the activations that activation
    checkpointing keeps are half the size (as FSDP's bf16 policy makes them anyway).

    ``on_host``: the table stays in host memory (see ``host_parameters``); the lookup runs
    there and only the looked-up rows go to the tokens' device."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype,
                 compute_dtype: torch.dtype, on_host: bool = False):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        self.weight.requires_grad_(False)
        self.compute_dtype, self.on_host = compute_dtype, on_host

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens.to(self.weight.device), self.weight)
        return rows.to(tokens.device, self.compute_dtype, non_blocking=True)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside this block ``model`` computes as its frozen base alone: every adapter's update is
    scaled by 0 (base + 0: the base's outputs exactly), the scales restored after. The base
    without a second copy in memory (predict's before/after comparison)."""
    adapted = [module for module in model.modules() if isinstance(module, LoRALinear)]
    scales = [module.scale for module in adapted]
    for module in adapted:
        module.scale = 0.0
    try:
        yield
    finally:
        for module, scale in zip(adapted, scales):
            module.scale = scale


def host_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Frozen weights that stay in host memory (an ``on_host`` embedding table or linear), by
    name."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, (FrozenEmbedding, FrozenLinear)) and module.on_host}


def place_on_host(model: nn.Module) -> dict[str, nn.Parameter]:
    """Allocate the host-resident weights (``host_parameters``) of a meta-device model in host
    memory; returns them, for FSDP and DDP to leave out (every rank holds them whole)."""
    for module in model.modules():
        if isinstance(module, FrozenEmbedding) and module.on_host:
            module.to_empty(device="cpu")
    return host_parameters(model)


def _frozen(module: nn.Linear, dtype: torch.dtype, adapter: dict | None) -> FrozenLinear:
    bias = module.bias is not None
    if adapter is None:
        return FrozenLinear(module.in_features, module.out_features, dtype, bias)
    return LoRALinear(module.in_features, module.out_features, dtype, **adapter, bias=bias)


def apply_lora(model: Transformer, rank: int, alpha: float, dropout: float,
               targets: list[str], base_dtype: torch.dtype,
               compute_dtype: torch.dtype = torch.float32,
               embedding_on_host: bool = False) -> None:
    """Freeze ``model`` (built on the meta device, before any parallelism) in ``base_dtype``
    and put adapters on the linears named in ``targets`` (see ``config.schema.TARGETS``); the
    hidden states start in ``compute_dtype`` (see ``FrozenEmbedding``, also for
    ``embedding_on_host``)."""
    adapter = {"rank": rank, "alpha": alpha, "dropout": dropout}
    with torch.device(model.norm.weight.device):  # new modules where the model is (meta)
        _replace_modules(model, adapter, targets, base_dtype, compute_dtype)
    model.tok_embeddings.on_host = embedding_on_host


def _replace_modules(model: Transformer, adapter: dict, targets: list[str],
                     base_dtype: torch.dtype, compute_dtype: torch.dtype) -> None:
    for block in model.layers.values():
        for parent in (block.attention, block.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, _frozen(child, base_dtype,
                                                  adapter if name in targets else None))
        for norm in block.modules():
            if isinstance(norm, RMSNorm):  # (with Qwen3's q/k norms)
                norm.weight = nn.Parameter(norm.weight.to(base_dtype), requires_grad=False)
    if model.output is not None:
        model.output = _frozen(model.output, base_dtype,
                               adapter if "output" in targets else None)
    old = model.tok_embeddings
    model.tok_embeddings = FrozenEmbedding(old.num_embeddings, old.embedding_dim, base_dtype,
                                           compute_dtype)
    model.norm.weight = nn.Parameter(model.norm.weight.to(base_dtype), requires_grad=False)


def block_linears(parts: Iterable[nn.Module]) -> Iterator[tuple[str, FrozenLinear]]:
    """The frozen linears inside the transformer blocks (what QLoRA quantises)."""
    for part in parts:
        for name, module in part.named_modules():
            if isinstance(module, FrozenLinear) and name.startswith("layers."):
                yield name, module


def quantize_block_linears(model: nn.Module, device: torch.device, on_host: bool = False
                           ) -> None:
    """QLoRA: the block linears' frozen weights in NF4 on ``device`` (``quantize_linears``).
    ``on_host`` (``device`` is the host): they stay there, pinned when there is a GPU to copy
    them to, and each linear copies its weight to the GPU where it computes (forward, then
    backward, and an activation checkpoint's recomputation): the GPU holds one at a time."""
    linears = [module for _, module in block_linears([model])]
    quantize_linears(linears, device, pin_memory=on_host and torch.cuda.is_available())
    for module in linears:
        module.on_host = on_host


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a LoRA adapter's (not part of the base model)."""
    return _ADAPTER.fullmatch(name) is not None


def base_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the base model's weights: everything but the adapters."""
    return ((name, p) for name, p in module.named_parameters() if not is_adapter(name))


def adapter_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of the LoRA adapters only."""
    return ((name, p) for name, p in module.named_parameters() if is_adapter(name))


def merge_adapters(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A plain model's state dict from a LoRA one (full tensors): each ``X.weight`` with
    adapters becomes W + scale B A (computed in float32, stored in W's dtype); the adapter
    entries are dropped. Pure: ``state`` is not changed."""
    merged = {name: t for name, t in state.items() if not is_adapter(name)}
    for name in state:
        match = _ADAPTER.fullmatch(name)
        if match is None or not name.endswith("lora_a.weight"):
            continue
        prefix = match.group(1)
        weight = merged[f"{prefix}.weight"]
        delta = state[f"{prefix}.lora_b.weight"].float() @ state[name].float()
        merged[f"{prefix}.weight"] = (weight.float() + scale * delta).to(weight.dtype)
    return merged
