"""The attention interface between the model and the paged KV cache.

The model calls `backend.forward(layer, q, k, v)` for every layer of a flat batch; the backend
writes the new K/V into the cache and attends over it using the step's `AttentionMetadata`.
`TorchPagedAttention` is the CPU path (batched torch over gathered pages, checked against
kernels/reference.py); the Triton kernels plug in behind the same two methods on GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.reference import FP8_DTYPE, token_minor_v, write_kv_ref


@dataclass
class AttentionMetadata:
    """One step's flat batch. Device tensors, plus host-side sizes (no device sync needed)."""
    query_start_loc: torch.Tensor   # int32 [num_seqs + 1]
    seq_lens: torch.Tensor          # int32 [num_seqs]  (context incl. new tokens)
    block_tables: torch.Tensor      # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor      # int64 [num_tokens]; -1 = padding
    query_lens_host: list[int]
    seq_lens_host: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class KVCache:
    """All layers' paged KV in one tensor: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim].

    Region (layer, k|v, block) is contiguous, which is what kvtransfer moves. FP8 caches carry
    per-(layer, k|v, kv-head) float32 scales [num_layers, 2, num_kv_heads] and store their V
    pages token-minor (bytes [num_kv_heads, head_dim, block_size] per page, see
    kernels.reference.token_minor_v): `layer(i)` hands out the logical views either way."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device,
                 v_token_minor: bool | None = None):
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                              dtype=dtype, device=device)
        self.scales = (torch.ones(num_layers, 2, num_kv_heads, dtype=torch.float32, device=device)
                       if dtype == FP8_DTYPE else None)
        self.v_token_minor = dtype == FP8_DTYPE if v_token_minor is None else v_token_minor

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[2]

    @property
    def block_size(self) -> int:
        return self.kv.shape[3]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        ks = vs = None
        if self.scales is not None:
            ks, vs = self.scales[i, 0], self.scales[i, 1]
        v = token_minor_v(self.kv[i, 1]) if self.v_token_minor else self.kv[i, 1]
        return self.kv[i, 0], v, ks, vs

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize


class TorchPagedAttention:
    """CPU attention: gather each sequence's pages into a padded batch, one SDPA per layer."""

    def __init__(self, cache: KVCache, scale: float):
        self.cache = cache
        self.scale = scale
        self.meta: AttentionMetadata | None = None

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build the step's gather indices and mask once; every layer reuses them."""
        self.meta = meta
        bs = self.cache.block_size
        device = meta.block_tables.device
        n, s_max, q_max = meta.num_seqs, meta.max_seq_len, meta.max_query_len
        pos = torch.arange(s_max, device=device)
        blk = meta.block_tables.long().gather(1, (pos // bs).expand(n, -1).clamp(max=meta.block_tables.shape[1] - 1))
        self._kv_index = (blk, (pos % bs).expand(n, -1))                     # [n, s_max] each
        q_lens = torch.tensor(meta.query_lens_host, device=device)
        seq_lens = torch.tensor(meta.seq_lens_host, device=device)
        qi = torch.arange(q_max, device=device)
        self._q_valid = qi[None, :] < q_lens[:, None]                          # [n, q_max]
        self._q_index = (meta.query_start_loc[:-1].long()[:, None] + qi[None, :])[self._q_valid]
        qpos = seq_lens[:, None] - q_lens[:, None] + qi[None, :]              # absolute position
        allowed = pos[None, None, :] <= qpos[:, :, None]                      # causal + length
        self._mask = allowed[:, None]                                         # [n, 1, q_max, s_max]

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        meta = self.meta
        k_cache, v_cache, k_scale, v_scale = self.cache.layer(layer)
        write_kv_ref(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        n, q_max = meta.num_seqs, meta.max_query_len
        kk = self._gather(k_cache, k_scale, q.dtype)                          # [n, Hkv, s_max, D]
        vv = self._gather(v_cache, v_scale, q.dtype)
        qp = q.new_zeros(n, q_max, q.shape[1], q.shape[2])
        qp[self._q_valid] = q[self._q_index]
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), kk, vv, attn_mask=self._mask,
                                             scale=self.scale, enable_gqa=True)  # [n, Hq, q_max, D]
        flat = torch.empty_like(q)
        flat[self._q_index] = out.transpose(1, 2)[self._q_valid]
        return flat

    def _gather(self, cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        g = cache[self._kv_index]                                              # [n, s_max, Hkv, D]
        if scale is not None:
            g = g.float() * scale[:, None]
        return g.to(dtype).transpose(1, 2)
