"""Torch reference of `paged_prefill_attention`: the new tokens' K/V from contiguous tensors, the
cached prefix from the paged cache.

Same contract as `reference.paged_attention_ref` (the layouts and flat-batch metadata are
described there), except that the q_len_i new tokens of sequence i take their keys and values
from `k`, `v` ([num_tokens, num_kv_heads, head_dim], the step's projection output, k rotated)
rather than from their cache slots; only the seq_len_i - q_len_i cached tokens come from the
pages. For a 16-bit cache that holds this step's K/V the two references agree exactly. For an
FP8 cache, `quantize_new_kv=True` (the kernel's default) first rounds the new K/V as
`write_kv_ref` stores them, which again equals `paged_attention_ref` over the written cache;
False attends to the unquantized K/V.
"""
from __future__ import annotations

import torch

from .reference import FP8_DTYPE, FP8_MAX, gather_seq_kv


def prefill_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                          block_tables: torch.Tensor, scale: float,
                          k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None,
                          quantize_new_kv: bool = True) -> torch.Tensor:
    """q: [T, Hq, D]; k, v: [T, Hkv, D] -> [T, Hq, D] in q's dtype, computed in float32."""
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of "
                         f"num_kv_heads {num_kv_heads}")
    group = num_q_heads // num_kv_heads
    if quantize_new_kv and k_cache.dtype == FP8_DTYPE:
        k, v = _as_stored(k, k_scale), _as_stored(v, v_scale)
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = qsl[i], qsl[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        ctx = seq_len - q_len
        kk = torch.cat([gather_seq_kv(k_cache, block_tables[i], ctx, k_scale),
                        k[start:end].float()])                             # [S, Hkv, D]
        vv = torch.cat([gather_seq_kv(v_cache, block_tables[i], ctx, v_scale),
                        v[start:end].float()])
        qi = q[start:end].float().transpose(0, 1)                          # [Hq, q_len, D]
        kk = kk.transpose(0, 1).repeat_interleave(group, dim=0)            # [Hq, S, D]
        vv = vv.transpose(0, 1).repeat_interleave(group, dim=0)
        scores = torch.matmul(qi, kk.transpose(1, 2)) * scale              # [Hq, q_len, S]
        qpos = torch.arange(ctx, seq_len, device=q.device).unsqueeze(1)
        kpos = torch.arange(seq_len, device=q.device).unsqueeze(0)
        probs = torch.softmax(scores.masked_fill(kpos > qpos, float("-inf")), dim=-1)
        out[start:end] = torch.matmul(probs, vv).transpose(0, 1).to(q.dtype)
    return out


def _as_stored(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """New K/V [T, Hkv, D] -> the real values of their FP8 cache copies (as write_kv_ref)."""
    q8 = (x.float() / scale.float()[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q8.float() * scale.float()[:, None]
