"""paged_extend_attention (Triton) against paged_attention_ref: prefill, chunked prefill and
prefix-hit extends, varlen in one launch.

Tolerances: as in test_kernels_decode.py (same arithmetic: fp32-accumulated dots of fp16/bf16
operands, probabilities rounded to the compute dtype, one output rounding): rel_err <= 1e-2
for bf16 and 2e-3 for fp16, elementwise rtol*|ref| + atol*max|ref| with the same constants.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from splitserve.kernels.testing import make_paged_case, setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

import splitserve.kernels.extend_attention as extend_mod  # noqa: E402
from splitserve.kernels import paged_attention_ref, paged_extend_attention  # noqa: E402

from .test_kernels_decode import KV, TOL, assert_close  # noqa: E402


def run_case(seq_lens, q_lens, num_q_heads, num_kv_heads, head_dim, block_size, kv, seed,
             max_query_len=True, v_token_minor=None):
    dtype, kv_dtype = KV[kv]
    c = make_paged_case(seq_lens, q_lens, num_q_heads, num_kv_heads, head_dim, block_size,
                        dtype, kv_dtype, device=DEVICE, seed=seed, v_token_minor=v_token_minor)
    cpu = [None if t is None else t.cpu() for t in (c.q, c.k_cache, c.v_cache,
                                                    c.query_start_loc, c.seq_lens,
                                                    c.block_tables)]
    ref = paged_attention_ref(*cpu, c.scale,
                              None if c.k_scale is None else c.k_scale.cpu(),
                              None if c.v_scale is None else c.v_scale.cpu())
    out = torch.full_like(c.q, float("nan"))
    got = paged_extend_attention(c.q, c.k_cache, c.v_cache, c.query_start_loc, c.seq_lens,
                                 c.block_tables, c.scale, c.k_scale, c.v_scale,
                                 max_query_len=c.max_query_len if max_query_len else None,
                                 out=out)
    assert got is out
    assert_close(out.cpu(), ref, TOL[dtype])


@pytest.fixture
def small_tiles(monkeypatch):
    """16-token query and key tiles so that small CPU cases cross the tile edges."""
    monkeypatch.setattr(extend_mod, "BLOCK_M", 16)
    monkeypatch.setattr(extend_mod, "BLOCK_N", 16)


def mixed_batch(block_size: int) -> tuple[list[int], list[int]]:
    """(seq_lens, q_lens): decode-like, prefill at the paging edges, extends over prefixes."""
    bs = block_size
    seq_lens = [1, bs - 1, bs, bs + 1, 3 * bs + 5, 2 * bs + 1, 40]
    q_lens = [1, bs - 1, 1, bs + 1, 19, bs, 17]       # prefixes: 0, 0, bs-1, 0, .., bs+1, 23
    return seq_lens, q_lens


@pytest.mark.parametrize("kv", list(KV))
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])
def test_extend_dtypes_and_gqa(kv, num_q_heads, num_kv_heads, small_tiles):
    head_dim, block_size = (64, 16) if num_kv_heads == 2 else (128, 32)
    seq_lens, q_lens = mixed_batch(block_size)
    run_case(seq_lens, q_lens, num_q_heads, num_kv_heads, head_dim, block_size, kv,
             seed=num_q_heads + 3 * len(kv))


def test_extend_fp8_in_q_dtype(small_tiles, monkeypatch):
    """The alternative FP8 path: K/V converted to q's dtype instead of fp16."""
    monkeypatch.setattr(extend_mod, "FP8_FP16_COMPUTE", False)
    seq_lens, q_lens = mixed_batch(16)
    run_case(seq_lens, q_lens, 8, 2, 64, 16, "fp8-bf16", seed=13)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_extend_head_dims_block_sizes(head_dim, block_size, small_tiles):
    seq_lens, q_lens = mixed_batch(block_size)
    run_case(seq_lens, q_lens, 4, 1, head_dim, block_size, "bf16", seed=head_dim + block_size)


@pytest.mark.parametrize("kv,v_token_minor", [("fp8-bf16", False), ("bf16", True)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_extend_both_v_page_layouts(kv, v_token_minor, block_size, small_tiles):
    """The non-default V page layout of each cache dtype (FP8 token-major, 16-bit token-minor)."""
    seq_lens, q_lens = mixed_batch(block_size)
    run_case(seq_lens, q_lens, 8, 2, 64, block_size, kv, seed=block_size + 7,
             v_token_minor=v_token_minor)


def test_extend_default_tiles_without_max_query_len():
    """Shipped tiles (128 x 64); grid sized from num_tokens; an empty sequence in the batch."""
    run_case([150, 20, 7, 65], [150, 3, 0, 64], 4, 2, 64, 16, "fp8-bf16", seed=9,
             max_query_len=False)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 40)), min_size=1, max_size=3),
       st.sampled_from(["bf16", "fp16", "fp8-bf16"]))
def test_extend_random_batches(seqs, kv):
    """Random (q_len, prefix_len) batches under the small tiles."""
    q_lens = [q for q, _ in seqs]
    seq_lens = [q + p for q, p in seqs]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extend_mod, "BLOCK_M", 16)
        mp.setattr(extend_mod, "BLOCK_N", 16)
        run_case(seq_lens, q_lens, 4, 2, 64, 16, kv, seed=sum(seq_lens))


@pytest.mark.slow
def test_extend_long_prefill_default_tiles():
    """A 1k-token prefill plus an extend over a 700-token prefix with the shipped tiles."""
    run_case([1030, 900], [1030, 200], 4, 1, 128, 16, "bf16", seed=10)
