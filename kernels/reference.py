"""Torch reference implementations of the paged-attention contract.

These define the semantics every Triton kernel in this package must match, and they are
what the engine runs on CPU.

Paged KV layout (one layer):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    slot = block_id * block_size + offset_in_block
V pages come in two byte layouts with the same logical shape (and the same semantics): token-major
like K ([block_size, num_kv_heads, head_dim] per page), or token-minor ([num_kv_heads, head_dim,
block_size] per page, `token_minor_v`), where a page's tokens are adjacent for each (head, d):
the P.V product reduces over tokens, and 8-bit tensor-core operands must be contiguous along
the reduced dim, so FP8 caches use it (the K side, reduced over head_dim, is right as is).
FP8 (e4m3) caches carry per-KV-head float32 scales: k_scale, v_scale: [num_kv_heads];
    real value = stored.float() * scale[head].
Flat batch metadata (num_seqs sequences, num_tokens new tokens in all):
    query_start_loc: int32 [num_seqs + 1]  cumulative new-token counts (q for seq i is
                     q[query_start_loc[i]:query_start_loc[i+1]])
    seq_lens:        int32 [num_seqs]      context length of seq i *including* its new tokens
    block_tables:    int32 [num_seqs, max_blocks_per_seq]
    slot_mapping:    int64 [num_tokens]    cache slot of each new token; -1 = padding (skipped)
The new tokens of seq i are its last q_len_i positions; they attend causally to themselves and
fully to the seq_len_i - q_len_i cached tokens before them.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def token_minor_v(pages: torch.Tensor) -> torch.Tensor:
    """A contiguous [num_blocks, block_size, num_kv_heads, head_dim] allocation used as
    token-minor V pages: each page's bytes are [num_kv_heads, head_dim, block_size]. Returns the
    logical [num_blocks, block_size, num_kv_heads, head_dim] view (strides (*, 1, D * bs, bs))
    that every reference and kernel indexes as usual."""
    nb, bs, h, d = pages.shape
    return pages.view(nb, h, d, bs).permute(0, 3, 1, 2)


def _check_scales(cache: torch.Tensor, scale: torch.Tensor | None, name: str) -> None:
    if cache.dtype == FP8_DTYPE and scale is None:
        raise ValueError(f"{name} is FP8 but no {name.replace('cache', 'scale')} was given; "
                         "an FP8 KV cache must travel with its scales")


def dequant(cache_part: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """[..., num_kv_heads, head_dim] stored values -> float32 real values."""
    out = cache_part.float()
    if scale is not None:
        out = out * scale.float()[:, None]
    return out


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> None:
    """Write new K/V ([num_tokens, num_kv_heads, head_dim]) into their cache slots in place.

    Tokens whose slot is negative are padding and are skipped. For an FP8 cache the values are
    divided by the per-head scale and saturated to the e4m3 range before the cast.
    """
    _check_scales(k_cache, k_scale, "k_cache")
    _check_scales(v_cache, v_scale, "v_cache")
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    block_size = k_cache.shape[1]
    blk, off = slots // block_size, slots % block_size
    for src, cache, scale in ((k[valid], k_cache, k_scale), (v[valid], v_cache, v_scale)):
        val = src.float()
        if cache.dtype == FP8_DTYPE:
            val = (val / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX)
        cache[blk, off] = val.to(cache.dtype)


def gather_seq_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                  scale: torch.Tensor | None = None) -> torch.Tensor:
    """The first seq_len tokens of one sequence as float32 [seq_len, num_kv_heads, head_dim]."""
    block_size = cache.shape[1]
    nblk = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:nblk].long()]          # [nblk, block_size, H, D]
    flat = blocks.reshape(-1, *cache.shape[2:])[:seq_len]
    return dequant(flat, scale)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float,
                        k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the new tokens over the paged cache (their own K/V already written).

    q: [num_tokens, num_q_heads, head_dim]; returns [num_tokens, num_q_heads, head_dim] in
    q's dtype, computed in float32. GQA: q head h reads kv head h // (num_q_heads // num_kv_heads).
    """
    _check_scales(k_cache, k_scale, "k_cache")
    _check_scales(v_cache, v_scale, "v_cache")
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_seq_kv(k_cache, block_tables[i], seq_len, k_scale)   # [S, Hkv, D]
        v = gather_seq_kv(v_cache, block_tables[i], seq_len, v_scale)
        qi = q[start:end].float().transpose(0, 1)                        # [Hq, q_len, D]
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)            # [Hq, S, D]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qi, k.transpose(1, 2)) * scale             # [Hq, q_len, S]
        # query j (0-based among new tokens) sits at position seq_len - q_len + j
        qpos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
        kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(kpos > qpos, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
    return out


def decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                         k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode: one new token per sequence (q: [num_seqs, num_q_heads, head_dim]).

    The same contract as `paged_attention_ref` with query_start_loc = arange(num_seqs + 1).
    """
    query_start_loc = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens, block_tables,
                               scale, k_scale, v_scale)
