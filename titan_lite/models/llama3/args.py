"""Llama model hyper-parameters and the published flavors: Llama 3.x; Llama 2 (the same
architecture with multi-head attention for 7B/13B, RoPE theta 10,000 and a 32,000-token
sentencepiece vocabulary); and the families that are Llama with switches: Qwen2 / Qwen2.5
(biases on q, k and v), Qwen3 (RMSNorm on each head's q and k, a head size of its own) and
Mistral (a sliding window no shorter than the trained context, where it is plain causal
attention)."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (long-context extension of the base frequencies)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (plain multi-head attention)
    vocab_size: int = 128256
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    ffn_hidden_size: int | None = None  # explicit FFN width (e.g. from a Hugging Face config)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3)
    head_size: int | None = None  # None: dim / n_heads (Qwen3's is its own)
    # The checkpoint's attention window: the job must train (and generate) within it, where
    # windowed attention is exactly causal attention; kept to write back on export.
    sliding_window: int | None = None
    family: str = "llama"  # the Hugging Face model_type written on export

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size as Meta computes it: 2/3 of 4*dim, scaled, rounded up."""
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def validate(self) -> None:
        if self.head_size is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads "
                             f"{self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    def with_vocab(self, vocab_size: int) -> ModelArgs:
        return replace(self, vocab_size=vocab_size)


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
_LLAMA31_SCALING = RopeScaling(factor=8.0)
_LLAMA32_SCALING = RopeScaling(factor=32.0)

# Published dimensions: Llama 3.2 (1B, 3B), Llama 3.1 (8B, 70B, 405B), Llama 2 (7B, 13B, 70B).
# debugmodel and small are for development; their vocab comes from the tokenizer at build time.
FLAVORS: dict[str, ModelArgs] = {
    "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2256, max_seq_len=2048),
    "small": ModelArgs(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, vocab_size=2256,
                       max_seq_len=2048),
    "1B": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5,
                    multiple_of=256, rope_scaling=_LLAMA32_SCALING, max_seq_len=131072,
                    tie_word_embeddings=True),
    "3B": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0,
                    multiple_of=256, rope_scaling=_LLAMA32_SCALING, max_seq_len=131072,
                    tie_word_embeddings=True),
    "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3,
                    multiple_of=1024, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3,
                     multiple_of=4096, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                      multiple_of=4096, rope_scaling=_LLAMA31_SCALING, max_seq_len=131072),
    "llama2_7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000,
                           rope_theta=10000.0, max_seq_len=4096),
    "llama2_13B": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=32000,
                            rope_theta=10000.0, max_seq_len=4096),
    "llama2_70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                            ffn_dim_multiplier=1.3, multiple_of=4096, rope_theta=10000.0,
                            max_seq_len=4096),
    # Qwen2.5 (0.5B / 1.5B tie the output to the embedding) and Qwen3, as their config.json
    "qwen2.5_0.5B": ModelArgs(dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                              ffn_hidden_size=4864, vocab_size=151936, norm_eps=1e-6,
                              rope_theta=1e6, max_seq_len=32768, tie_word_embeddings=True,
                              qkv_bias=True, family="qwen2"),
    "qwen2.5_1.5B": ModelArgs(dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                              ffn_hidden_size=8960, vocab_size=151936, norm_eps=1e-6,
                              rope_theta=1e6, max_seq_len=32768, tie_word_embeddings=True,
                              qkv_bias=True, family="qwen2"),
    "qwen2.5_7B": ModelArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                            ffn_hidden_size=18944, vocab_size=152064, norm_eps=1e-6,
                            rope_theta=1e6, max_seq_len=32768, qkv_bias=True, family="qwen2"),
    "qwen3_0.6B": ModelArgs(dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_size=128,
                            ffn_hidden_size=3072, vocab_size=151936, norm_eps=1e-6,
                            rope_theta=1e6, max_seq_len=40960, tie_word_embeddings=True,
                            qk_norm=True, family="qwen3"),
    "qwen3_8B": ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_size=128,
                          ffn_hidden_size=12288, vocab_size=151936, norm_eps=1e-6,
                          rope_theta=1e6, max_seq_len=40960, qk_norm=True, family="qwen3"),
    # Mistral 7B v0.3 (v0.1's 4096-token sliding window is gone from v0.2 on)
    "mistral_7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                            ffn_hidden_size=14336, vocab_size=32768, rope_theta=1e6,
                            max_seq_len=32768, family="mistral"),
}
