"""paged_prefill_attention (Triton) against prefill_attention_ref: prefill, chunked prefill and
prefix-hit extends, varlen in one launch, the new tokens' K/V from strided views of a fused qkv.

The new tokens' cache slots are NaN-poisoned (besides make_paged_case's poisoned tails and
spare blocks), so a kernel that reads them instead of k/v fails. For 16-bit caches the result
must also match paged_attention_ref over the unpoisoned cache (the same K/V either way).

FP8 caches: by default the kernel rounds the new K/V as write_kv stores them, so the result
must also match paged_attention_ref over the cache with them written; quantize_new_kv=False
is checked against the reference's unquantized variant.

Tolerances: as in test_kernels_extend.py / test_kernels_decode.py, because the arithmetic is
the same: fp32-accumulated dots of fp16/bf16 operands (FP8 prefix pages are converted exactly
to q's dtype), probabilities rounded to the compute dtype before P.V, one output rounding.
So rel_err <= 1e-2 for bf16 and 2e-3 for fp16, elementwise rtol*|ref| + atol*max|ref|.
"""
from __future__ import annotations

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from splitserve.kernels.testing import make_paged_case, setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

import splitserve.kernels.prefill_attention as prefill_mod  # noqa: E402

if DEVICE == "cpu" and type(prefill_mod._prefill_kernel).__name__ == "JITFunction":
    prefill_mod = importlib.reload(prefill_mod)   # built before TRITON_INTERPRET was set

from splitserve.kernels import (FP8_DTYPE, paged_attention_ref, prefill_attention_ref,  # noqa: E402
                                write_kv_ref)

from .test_kernels_decode import KV, TOL, assert_close  # noqa: E402


def new_kv(c, kv_dtype, gen, pad: int = 0):
    """The new tokens' K/V as views of one fused [T, (Hq + 2 Hkv) * D + pad] buffer, and a copy
    of the caches with them written (write_kv_ref); their slots in c's caches are NaN-poisoned.

    16-bit caches: the values already in the new tokens' slots. FP8: fresh random values in q's
    dtype (the kernel must quantize them itself, or not, as asked)."""
    T, hq, d = c.q.shape
    hkv, bs = c.k_cache.shape[2], c.k_cache.shape[1]
    qsl, lens, tables = c.query_start_loc.tolist(), c.seq_lens.tolist(), c.block_tables.cpu()
    slots = []
    for i, s in enumerate(lens):
        pos = torch.arange(s - (qsl[i + 1] - qsl[i]), s)
        slots.append(tables[i].long()[pos // bs] * bs + pos % bs)
    slots = torch.cat(slots).to(c.q.device)
    blk, off = slots // bs, slots % bs
    fused = torch.full((T, (hq + 2 * hkv) * d + pad), float("nan"), dtype=c.q.dtype,
                       device=c.q.device)
    fused[:, :hq * d] = c.q.reshape(T, -1)
    k = fused[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = fused[:, (hq + hkv) * d:(hq + 2 * hkv) * d].view(T, hkv, d)
    for new, cache in ((k, c.k_cache), (v, c.v_cache)):
        if kv_dtype == FP8_DTYPE:
            new.copy_(torch.randn(T, hkv, d, generator=gen).to(new.device) * 8)
        else:
            new.copy_(cache[blk, off])
    full = (c.k_cache.clone(), c.v_cache.clone())
    write_kv_ref(k, v, *full, slots, c.k_scale, c.v_scale)
    c.k_cache[blk, off] = float("nan")
    c.v_cache[blk, off] = float("nan")
    return fused[:, :hq * d].view(T, hq, d), k, v, full


def run_case(seq_lens, q_lens, num_q_heads, num_kv_heads, head_dim, block_size, kv, seed,
             max_query_len=True, pad=0, quantize=True, v_token_minor=None):
    dtype, kv_dtype = KV[kv]
    c = make_paged_case(seq_lens, q_lens, num_q_heads, num_kv_heads, head_dim, block_size,
                        dtype, kv_dtype, device=DEVICE, seed=seed, v_token_minor=v_token_minor)
    q, k, v, full = new_kv(c, kv_dtype, torch.Generator().manual_seed(seed), pad)
    meta = (c.query_start_loc.cpu(), c.seq_lens.cpu(), c.block_tables.cpu(), c.scale,
            None if c.k_scale is None else c.k_scale.cpu(),
            None if c.v_scale is None else c.v_scale.cpu())
    ref = prefill_attention_ref(q.cpu(), k.cpu(), v.cpu(), c.k_cache.cpu(), c.v_cache.cpu(), *meta,
                                quantize_new_kv=quantize)
    out = torch.full_like(c.q, float("nan"))
    got = prefill_mod.paged_prefill_attention(
        q, k, v, c.k_cache, c.v_cache, c.query_start_loc, c.seq_lens, c.block_tables, c.scale,
        c.k_scale, c.v_scale, max_query_len=c.max_query_len if max_query_len else None, out=out,
        quantize_new_kv=quantize)
    assert got is out
    assert_close(out.cpu(), ref, TOL[dtype])
    if quantize or kv_dtype != FP8_DTYPE:   # the same as attending over the written cache
        assert_close(out.cpu(), paged_attention_ref(q.cpu(), full[0].cpu(), full[1].cpu(), *meta),
                     TOL[dtype])


@pytest.fixture
def small_tiles(monkeypatch):
    """16-token query and key tiles so that small CPU cases cross the tile edges."""
    monkeypatch.setattr(prefill_mod, "BLOCK_M", 16)
    monkeypatch.setattr(prefill_mod, "BLOCK_N", 16)


def mixed_batch(block_size: int) -> tuple[list[int], list[int]]:
    """(seq_lens, q_lens): decode-like, prefill at the paging edges, extends over prefixes."""
    bs = block_size
    seq_lens = [1, bs - 1, bs, bs + 1, 3 * bs + 5, 2 * bs + 1, 40]
    q_lens = [1, bs - 1, 1, bs + 1, 19, bs, 17]       # prefixes: 0, 0, bs-1, 0, .., bs+1, 23
    return seq_lens, q_lens


@pytest.mark.parametrize("kv", list(KV))
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
def test_prefill_dtypes_and_gqa(kv, num_q_heads, num_kv_heads, small_tiles):
    # head_dim 128 is covered by test_prefill_head_dims_block_sizes (interpreter time)
    head_dim, block_size = (64, 16) if num_kv_heads == 2 else (64, 32)
    seq_lens, q_lens = mixed_batch(block_size)
    run_case(seq_lens, q_lens, num_q_heads, num_kv_heads, head_dim, block_size, kv,
             seed=num_q_heads + 3 * len(kv))


@pytest.mark.parametrize("kv", ["fp8-bf16", "fp8-fp16"])
def test_prefill_fp8_unquantized_new_kv(kv, small_tiles):
    """quantize_new_kv=False: the new tokens attend to their 16-bit K/V (prefix from FP8)."""
    seq_lens, q_lens = mixed_batch(16)
    run_case(seq_lens, q_lens, 8, 2, 64, 16, kv, seed=31, quantize=False)


@pytest.mark.parametrize("kv,v_token_minor", [("fp8-bf16", False), ("bf16", True)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_both_v_page_layouts(kv, v_token_minor, block_size, small_tiles):
    """The non-default V page layout of each cache dtype (FP8 token-major, 16-bit token-minor)."""
    seq_lens, q_lens = mixed_batch(block_size)
    run_case(seq_lens, q_lens, 8, 2, 64, block_size, kv, seed=block_size + 5,
             v_token_minor=v_token_minor)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_head_dims_block_sizes(head_dim, block_size, small_tiles):
    seq_lens, q_lens = mixed_batch(block_size)
    run_case(seq_lens, q_lens, 4, 1, head_dim, block_size, "bf16", seed=head_dim + block_size)


def test_prefill_uneven_tiles(monkeypatch):
    """BLOCK_M 32 over BLOCK_N 16 (several diagonal key tiles) and 16 over 32."""
    for bm, bn in ((32, 16), (16, 32)):
        monkeypatch.setattr(prefill_mod, "BLOCK_M", bm)
        monkeypatch.setattr(prefill_mod, "BLOCK_N", bn)
        run_case([70, 45, 33], [70, 30, 1], 4, 2, 64, 16, "fp16", seed=bm)


def test_prefill_default_tiles_without_max_query_len():
    """Shipped tiles; grid sized from num_tokens; an empty sequence in the batch."""
    run_case([150, 20, 7, 65], [150, 3, 0, 64], 4, 2, 64, 16, "fp8-bf16", seed=9,
             max_query_len=False)


@pytest.mark.parametrize("pad", [0, 3])
def test_prefill_tensor_descriptors(pad, small_tiles, monkeypatch):
    """USE_TMA: descriptors over the K/V views (pad 0); an unaligned token stride (pad 3)
    falls back to the pointer path."""
    monkeypatch.setattr(prefill_mod, "USE_TMA", True)
    seq_lens, q_lens = mixed_batch(16)
    run_case(seq_lens, q_lens, 8, 2, 64, 16, "bf16", seed=21 + pad, pad=pad)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 40)), min_size=1, max_size=3),
       st.sampled_from(["bf16", "fp16", "fp8-bf16"]))
def test_prefill_random_batches(seqs, kv):
    """Random (q_len, prefix_len) batches under the small tiles."""
    q_lens = [q for q, _ in seqs]
    seq_lens = [q + p for q, p in seqs]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(prefill_mod, "BLOCK_M", 16)
        mp.setattr(prefill_mod, "BLOCK_N", 16)
        run_case(seq_lens, q_lens, 4, 2, 64, 16, kv, seed=sum(seq_lens))


# ------------------------------------------------------------------ argument errors
def _args(kv="bf16"):
    dtype, kv_dtype = KV[kv]
    c = make_paged_case([20, 9], [12, 9], 4, 2, 64, 16, dtype, kv_dtype, device=DEVICE, seed=1)
    k = torch.randn(21, 2, 64, device=DEVICE).to(dtype)
    return [c.q, k, k.clone(), c.k_cache, c.v_cache, c.query_start_loc, c.seq_lens,
            c.block_tables, c.scale, c.k_scale, c.v_scale]


@pytest.mark.parametrize("i,bad,match", [
    (1, lambda a: a[1].float(), "k is torch.float32"),
    (2, lambda a: a[2][:, :1], "v must be"),
    (1, lambda a: a[1].transpose(1, 2).contiguous().transpose(1, 2), "contiguous in its last"),
    (1, lambda a: a[1][:, :, 0], "k must be 3-D"),
    (0, lambda a: a[0][:, :3], "not a multiple"),
    (5, lambda a: a[5].long(), "query_start_loc must be int32"),
    (9, lambda a: torch.ones(2, device=DEVICE), "k_scale was given"),
])
def test_prefill_argument_errors(i, bad, match):
    a = _args()
    a[i] = bad(a)
    with pytest.raises(ValueError, match=match):
        prefill_mod.paged_prefill_attention(*a)


def test_prefill_fp8_needs_scales_and_bounds():
    a = _args("fp8-bf16")
    a[9] = None
    with pytest.raises(ValueError, match="no k_scale"):
        prefill_mod.paged_prefill_attention(*a)
    with pytest.raises(ValueError, match="max_query_len"):
        prefill_mod.paged_prefill_attention(*_args(), max_query_len=-1)
    a = _args()
    out = torch.full_like(a[0], 7.0)
    assert prefill_mod.paged_prefill_attention(*a, max_query_len=0, out=out) is out
    assert (out == 7.0).all()


# ------------------------------------------------------------------ engine backend routing
def test_triton_backend_prefill_routing(monkeypatch):
    """TritonPagedAttention: a prefill step's forward (and rope_write_kv + attend) go through
    paged_prefill_attention with the given k, v; attend alone falls back to the extend kernel;
    all agree with the torch backend."""
    from splitserve import kernels
    from splitserve.engine.attention import AttentionMetadata, KVCache, TorchPagedAttention
    from splitserve.engine.attention_triton import TritonPagedAttention
    monkeypatch.setattr(prefill_mod, "BLOCK_M", 16)
    monkeypatch.setattr(prefill_mod, "BLOCK_N", 16)
    cache = KVCache(2, 8, 16, 2, 64, torch.float16, DEVICE)
    q_lens, seq_lens = [20, 5], [20, 21]          # a prefill and an extend over 16 cached
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=DEVICE)
    slots = torch.cat([torch.arange(20), 2 * 16 + torch.arange(16, 21)]).to(DEVICE)
    meta = AttentionMetadata(torch.tensor([0, 20, 25], dtype=torch.int32, device=DEVICE),
                             torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), tables,
                             slots, q_lens, seq_lens)
    cache.kv[:, :, 2] = torch.randn(cache.kv[:, :, 2].shape).to(DEVICE, torch.float16)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(25, h, 64, generator=gen).to(DEVICE, torch.float16) for h in (4, 2, 2))
    torch_be = TorchPagedAttention(KVCache(2, 8, 16, 2, 64, torch.float16, DEVICE), 0.125)
    torch_be.cache.kv.copy_(cache.kv)
    torch_be.prepare(meta)
    ref = torch_be.forward(1, q, k, v).cpu()
    tri = TritonPagedAttention(cache, 0.125, 4)
    calls = []
    real = kernels.paged_prefill_attention
    monkeypatch.setattr(kernels, "paged_prefill_attention",
                        lambda *a, **kw: calls.append(a[1]) or real(*a, **kw), raising=False)
    tri.prepare(meta)
    torch.testing.assert_close(tri.forward(1, q, k, v).cpu(), ref, rtol=2e-3, atol=2e-3)
    assert len(calls) == 1 and calls[0] is k
    torch.testing.assert_close(tri.attend(1, q).cpu(), ref, rtol=2e-3, atol=2e-3)  # extend
    assert len(calls) == 1
