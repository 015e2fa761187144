"""The GPU attention backend: the Triton paged kernels behind `TorchPagedAttention`'s interface.

    backend.prepare(meta)                 # once per step
    out = backend.forward(layer, q, k, v) # per layer: write_kv, then decode or prefill attention
    backend.rope_write_kv(layer, q, k, v, positions, cos_sin); out = backend.attend(layer, q)
                                          # the fused model path: the same, RoPE fused in
    rope = backend.rope_kv_target(layer, k, v, positions, cos_sin); <QKV GEMV with rope=rope>;
    out = backend.attend(layer, q)        # one-token steps: RoPE + KV write in the GEMV epilogue

Decode-only steps (every sequence adds one token) use `paged_decode_attention` (GQA-packed,
split-KV); everything else (prefill, chunked prefill, mixed batches) uses
`paged_prefill_attention`, which handles any query length including 1 and reads the step's new
K/V straight from the projection output (the k, v given to `forward` / `rope_write_kv`, k
rotated) and only the cached prefix from the pages. `attend` without a preceding
`rope_write_kv` for the layer falls back to `paged_extend_attention` (everything from the
cache). The split-KV count of a
decode step is planned on the host from shapes alone (batch size, kv heads, the block table's
width), and its float32 scratch is allocated once per (batch, splits) and reused by every
layer and every later step: a decode step launched this way reads no tensor value on the host
and allocates nothing that depends on values, so `engine/cuda_graph.py` can capture it.

FP8 (e4m3) caches: the per-(layer, k|v, kv-head) float32 scales live in `KVCache.scales` and
stay 1.0 (no calibration). e4m3 covers +-448 with 3 mantissa bits, so K/V activations of
Llama-family models (|x| well under 448 after RMSNorm'd projections) are stored with ~2^-4
relative rounding and no saturation; a calibrated scale would only matter for outliers > 448.
In a prefill step the new tokens attend to their own unquantized K/V (only the cached prefix
is read quantized), as vLLM-style systems do; later steps see those tokens quantized.
"""
from __future__ import annotations

import torch

from .attention import AttentionMetadata, KVCache


class TritonPagedAttention:
    """Paged attention through splitserve.kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""

    def __init__(self, cache: KVCache, scale: float, num_q_heads: int):
        from .. import kernels   # lazy: the Triton modules load only when this backend is built
        self.k = kernels
        self.cache = cache
        self.scale = scale
        self.num_q_heads = num_q_heads
        self.meta: AttentionMetadata | None = None
        self._decode = False
        self._num_splits = 1
        self._scratch = None
        self._scratches: dict[tuple[int, int], object] = {}
        # (layer, k, v): the step's new K/V from rope_write_kv, until that layer's attend
        self._new_kv: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        """Pick the kernel for the step and, for decode, the split count and its scratch."""
        self.meta = meta
        self._decode = meta.is_decode_only
        self._new_kv = None
        if not self._decode:
            return
        kv = self.cache.kv
        n, width = meta.num_seqs, meta.block_tables.shape[1]
        splits = self.k.plan_decode_splits(n, kv.shape[4], width * self.cache.block_size, kv.device,
                                           fp8=kv.dtype == self.k.FP8_DTYPE)
        self._num_splits = splits
        self._scratch = None
        if splits > 1:
            key = (n, splits)
            if key not in self._scratches:
                self._scratches[key] = self.k.alloc_split_kv_scratch(n, self.num_q_heads, kv.shape[5],
                                                                    splits, kv.device)
            self._scratch = self._scratches[key]

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] (views of the fused QKV are fine) -> [T, Hq, D]."""
        k_cache, v_cache, k_scale, v_scale = self.cache.layer(layer)
        self.k.write_kv(k, v, k_cache, v_cache, self.meta.slot_mapping, k_scale, v_scale)
        self._new_kv = (layer, k, v)
        return self.attend(layer, q)

    def rope_write_kv(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
        """RoPE on q and k in place and rotated k, v into the cache: one kernel (the fused model
        path calls this, then `attend`, instead of `forward`)."""
        k_cache, v_cache, k_scale, v_scale = self.cache.layer(layer)
        self.k.rope_write_kv(q, k, v, positions, cos_sin, k_cache, v_cache, self.meta.slot_mapping,
                             k_scale, v_scale)
        self._new_kv = (layer, k, v)     # k is rotated in place

    def rope_kv_target(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin: torch.Tensor):
        """What the QKV GEMV's epilogue needs to do `rope_write_kv`'s work for this layer
        (kernels.RopeKV); k, v are the views of the QKV output it writes, rotated k."""
        k_cache, v_cache, k_scale, v_scale = self.cache.layer(layer)
        self._new_kv = (layer, k, v)
        return self.k.RopeKV(positions, cos_sin, self.num_q_heads, k.shape[1], k_cache, v_cache,
                             self.meta.slot_mapping, k_scale, v_scale)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of q over the layer's cache, this step's K/V already written -> [T, Hq, D]."""
        meta = self.meta
        k_cache, v_cache, k_scale, v_scale = self.cache.layer(layer)
        new_kv, self._new_kv = self._new_kv, None     # drop the reference: qkv can be freed
        if self._decode:
            return self.k.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, k_scale, v_scale,
                num_splits=self._num_splits, scratch=self._scratch)
        if new_kv is not None and new_kv[0] == layer:
            return self.k.paged_prefill_attention(
                q, new_kv[1], new_kv[2], k_cache, v_cache, meta.query_start_loc, meta.seq_lens,
                meta.block_tables, self.scale, k_scale, v_scale, max_query_len=meta.max_query_len)
        return self.k.paged_extend_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, self.scale,
            k_scale, v_scale, max_query_len=meta.max_query_len)
