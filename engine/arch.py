"""The architecture of a Llama-family model, whatever file it came from, and named dummy shapes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ModelArch:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int = 0                     # 0 = hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # HF-style rope_scaling (llama3 / linear) or None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False                # Qwen2-style
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads {self.num_heads} not a multiple of "
                             f"num_kv_heads {self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        emb = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


_L3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           bos_token_id=128000, eos_token_ids=(128001, 128009))

SHAPES: dict[str, ModelArch] = {
    "llama3-8b": ModelArch(4096, 32, 32, 8, 14336, name="llama3-8b", **_L3),
    "llama3-70b": ModelArch(8192, 80, 64, 8, 28672, name="llama3-70b", **_L3),
    # the largest Llama shape whose bf16 weights (67 GB) leave room for a KV cache on one 141 GB
    # GPU: Code Llama 34B's layout (48 layers, GQA 64 q / 8 kv heads) with Llama 3's vocabulary
    "llama-34b-gqa": ModelArch(8192, 48, 64, 8, 22016, name="llama-34b-gqa", **_L3),
    "llama2-7b": ModelArch(4096, 32, 32, 32, 11008, 32000, max_position_embeddings=4096,
                           bos_token_id=1, eos_token_ids=(2,), name="llama2-7b"),
    "mistral-7b": ModelArch(4096, 32, 32, 8, 14336, 32768, rope_theta=1e6, max_position_embeddings=32768,
                            bos_token_id=1, eos_token_ids=(2,), name="mistral-7b"),
    "qwen2-7b": ModelArch(3584, 28, 28, 4, 18944, 152064, rope_theta=1e6, qkv_bias=True,
                          rms_norm_eps=1e-6, max_position_embeddings=32768, eos_token_ids=(151645,),
                          name="qwen2-7b"),
    "smollm2-135m": ModelArch(576, 30, 9, 3, 1536, 49152, rope_theta=100000.0, tie_word_embeddings=True,
                              max_position_embeddings=8192, bos_token_id=1, eos_token_ids=(2,),
                              name="smollm2-135m"),
    # small shapes for tests: real structure (GQA, bias, ties), tiny sizes
    "tiny": ModelArch(64, 2, 4, 2, 128, 512, max_position_embeddings=2048, eos_token_ids=(1,), name="tiny"),
    "tiny-qwen": ModelArch(64, 2, 4, 2, 128, 512, qkv_bias=True, max_position_embeddings=2048,
                           eos_token_ids=(1,), name="tiny-qwen"),
}


def dummy_arch(shape: str) -> ModelArch:
    if shape not in SHAPES:
        raise ValueError(f"unknown dummy shape {shape!r}; known: {', '.join(sorted(SHAPES))}")
    return replace(SHAPES[shape])
