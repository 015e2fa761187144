"""The engine's CPU attention path equals the paged-attention reference contract
(kernels/reference.py) on random paged caches: prefill chunks over cached prefixes, decode, FP8."""
from __future__ import annotations

import pytest
import torch

from splitserve.engine.attention import AttentionMetadata, KVCache, TorchPagedAttention
from splitserve.kernels.reference import FP8_DTYPE, paged_attention_ref, write_kv_ref


def _case(seq_lens, q_lens, block_size, hq, hkv, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    nblocks = sum(-(-s // block_size) for s in seq_lens) + 3
    cache = KVCache(1, nblocks, block_size, hkv, d, dtype, "cpu")
    if cache.scales is not None:
        cache.scales.uniform_(0.01, 0.05, generator=g)
    perm = torch.randperm(nblocks, generator=g).tolist()           # scattered blocks
    tables, slots, used = [], [], 0
    for s, q in zip(seq_lens, q_lens):
        nb = -(-s // block_size)
        table = perm[used:used + nb]
        used += nb
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
        # the cached prefix (positions < s - q) gets random KV
        pre = [table[p // block_size] * block_size + p % block_size for p in range(s - q)]
        if pre:
            kv = torch.randn(2, len(pre), hkv, d, generator=g)
            kc, vc, ks, vs = cache.layer(0)
            write_kv_ref(kv[0], kv[1], kc, vc, torch.tensor(pre), ks, vs)
    width = max(map(len, tables))
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    meta = AttentionMetadata(torch.tensor(qsl, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32),
                             torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
                             torch.tensor(slots), list(q_lens), list(seq_lens))
    T = qsl[-1]
    q = torch.randn(T, hq, d, generator=g)
    k = torch.randn(T, hkv, d, generator=g)
    v = torch.randn(T, hkv, d, generator=g)
    return cache, meta, q, k, v


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, FP8_DTYPE])
@pytest.mark.parametrize("seq_lens, q_lens", [([1, 15, 16, 17, 40], [1, 1, 1, 1, 1]),
                                              ([9, 33, 64], [9, 10, 1]), ([5], [5])])
def test_cpu_attention_equals_reference(seq_lens, q_lens, kv_dtype):
    bs, hq, hkv, d = 16, 8, 2, 32
    cache, meta, q, k, v = _case(seq_lens, q_lens, bs, hq, hkv, d, kv_dtype, seed=len(seq_lens))
    ref_cache = KVCache(1, cache.num_blocks, bs, hkv, d, kv_dtype, "cpu")
    ref_cache.kv.copy_(cache.kv)
    if cache.scales is not None:
        ref_cache.scales.copy_(cache.scales)
    attn = TorchPagedAttention(cache, d ** -0.5)
    attn.prepare(meta)
    out = attn.forward(0, q, k, v)
    kc, vc, ks, vs = ref_cache.layer(0)
    write_kv_ref(k, v, kc, vc, meta.slot_mapping, ks, vs)
    ref = paged_attention_ref(q, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                              d ** -0.5, ks, vs)
    assert torch.equal(cache.kv.view(torch.uint8), ref_cache.kv.view(torch.uint8)), "KV write differs"
    # both compute in float32 from the same stored values; only summation order differs
    tol = 1e-5 if kv_dtype == torch.float32 else 2e-2  # bf16/fp8 K,V are cast to q's dtype first
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_fp8_cache_without_scales_is_refused():
    kc = torch.zeros(2, 16, 1, 8, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="scale"):
        write_kv_ref(torch.ones(1, 1, 8), torch.ones(1, 1, 8), kc, kc.clone(), torch.tensor([0]))
