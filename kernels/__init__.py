"""splitserve.kernels: Triton kernels for the paged KV cache, each beside its torch reference.

API (all on CUDA tensors; CPU only under TRITON_INTERPRET=1 -- the engine's CPU path uses
`splitserve.kernels.reference` instead):

    write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None)
        new K/V [num_tokens, num_kv_heads, head_dim] into their slots (slot -1 skipped),
        quantizing to FP8 e4m3 (value / scale, saturated) when the cache is FP8.
    paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale,
                           k_scale=None, v_scale=None, out=None, num_splits=None, scratch=None)
        one query token per sequence; GQA-packed, split-KV; CUDA-graph capturable.
    paged_extend_attention(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale,
                           k_scale=None, v_scale=None, max_query_len=None, out=None)
        varlen prefill / chunked prefill / prefix-hit extend over the paged cache.
    paged_prefill_attention(q, k, v, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                            scale, k_scale=None, v_scale=None, max_query_len=None, out=None,
                            quantize_new_kv=True)
        the same with the new tokens' K/V from contiguous (strided) k, v; only the cached
        prefix is read from the pages (FP8: new K/V rounded as the cache stores them, unless
        quantize_new_kv=False).

The fused layer glue of the engine's GPU path (references in `reference_fused.py`):

    rms_norm(x, weight, eps, residual=None, out=None)
        RMSNorm; with residual, residual <- residual + x in place and the sum is normed.
    rope_write_kv(q, k, v, positions, cos_sin, k_cache=None, v_cache=None, slot_mapping=None,
                  k_scale=None, v_scale=None)
        rotate-half RoPE on q and k in place from a cos/sin cache; with a cache, also
        `write_kv` of the rotated k and v.
    silu_and_mul(gate_up, out=None)
        silu(gate) * up of the gated MLP.
    gemv_linear(x, weight, bias=None, out=None)
        F.linear for <= 32 tokens without a split-K reduce kernel (gemv.py).
    norm_linear(x, norm_weight, eps, weight, residual=None, residual_out=None, bias=None,
                silu=False, out=None, rope=None)
        rms_norm(+residual, the sum written to residual_out) -> linear (-> silu_and_mul) in one;
        with rope=RopeKV(...) the QKV projection followed by rope_write_kv (gemv_rope.py).
    argmax_rows(logits, out=None)
        torch.argmax(logits, dim=-1) split across programs (greedy sampling, argmax.py).
    skinny_linear(x, w, tile, bias=None, out=None), skinny_tile(n, k, m)
        skinny tensor-core y = x @ w.T for 1..256 tokens (K split merged in the launch), and
        the measured tile for a weight shape and token count (None: cuBLAS is faster).

Layouts and metadata are those of `reference.py`: caches [num_blocks, block_size,
num_kv_heads, head_dim] (V pages token-major or token-minor, `token_minor_v`); FP8 caches
need float32 [num_kv_heads] scales (refused without).
Every wrapper checks shapes, dtypes, strides and devices and raises ValueError; none reads
tensor values on the host.
"""
from __future__ import annotations

import importlib
from typing import Any

from .reference import (FP8_DTYPE, FP8_MAX, decode_attention_ref, paged_attention_ref,
                        token_minor_v, write_kv_ref)
from .reference_prefill import prefill_attention_ref
from .reference_fused import (gemv_linear_ref, norm_linear_ref, rms_norm_ref, rope_cos_sin_cache,
                              rope_ref, rope_write_kv_ref, silu_and_mul_ref)

# The Triton kernels load lazily, so the CPU engine can import the references without triton.
_LAZY = {
    "write_kv": "kv_write",
    "paged_decode_attention": "decode_attention",
    "plan_decode_splits": "decode_plan",
    "alloc_split_kv_scratch": "decode_attention",
    "SplitKVScratch": "decode_attention",
    "paged_extend_attention": "extend_attention",
    "paged_prefill_attention": "prefill_attention",
    "rms_norm": "rmsnorm",
    "rope_write_kv": "rope",
    "silu_and_mul": "silu_mul",
    "gemv_linear": "gemv",
    "norm_linear": "gemv",
    "RopeKV": "gemv_rope",
    "argmax_rows": "argmax",
    "skinny_linear": "skinny_gemm",
    "skinny_tile": "skinny_gemm",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FP8_DTYPE", "FP8_MAX", "SplitKVScratch", "alloc_split_kv_scratch", "decode_attention_ref",
    "paged_attention_ref", "paged_decode_attention", "paged_extend_attention",
    "paged_prefill_attention", "plan_decode_splits", "prefill_attention_ref", "rms_norm",
    "rms_norm_ref", "rope_cos_sin_cache", "rope_ref",
    "rope_write_kv", "rope_write_kv_ref", "silu_and_mul", "silu_and_mul_ref", "write_kv",
    "write_kv_ref", "token_minor_v", "gemv_linear", "gemv_linear_ref", "norm_linear",
    "norm_linear_ref", "RopeKV", "argmax_rows",
    "skinny_linear", "skinny_tile",
]
