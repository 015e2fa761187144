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

Layouts and metadata are those of `reference.py`: caches [num_blocks, block_size,
num_kv_heads, head_dim]; FP8 caches need float32 [num_kv_heads] scales (refused without).
Every wrapper checks shapes, dtypes, strides and devices and raises ValueError; none reads
tensor values on the host.
"""
from __future__ import annotations

import importlib
from typing import Any

from .reference import (FP8_DTYPE, FP8_MAX, decode_attention_ref, paged_attention_ref,
                        write_kv_ref)

# The Triton kernels load lazily, so the CPU engine can import the references without triton.
_LAZY = {
    "write_kv": "kv_write",
    "paged_decode_attention": "decode_attention",
    "plan_decode_splits": "decode_attention",
    "alloc_split_kv_scratch": "decode_attention",
    "SplitKVScratch": "decode_attention",
    "paged_extend_attention": "extend_attention",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FP8_DTYPE", "FP8_MAX", "SplitKVScratch", "alloc_split_kv_scratch", "decode_attention_ref",
    "paged_attention_ref", "paged_decode_attention", "paged_extend_attention",
    "plan_decode_splits", "write_kv", "write_kv_ref",
]
