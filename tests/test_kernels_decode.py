"""paged_decode_attention (Triton) against the float32 torch reference.

Tolerances. The reference computes in float32 from the same stored K/V (FP8 values dequantized
exactly), so the kernel's error comes from: q.K products of fp16/bf16 operands accumulated in
fp32 (exact products, ~1e-6 relative), probabilities rounded to the compute dtype before the
P.V dot (bf16: 2^-9 relative per weight, fp16: 2^-12), and the final rounding of the output
(bf16 2^-9, fp16 2^-12). Relative errors that are random across a sum of many terms add up in
quadrature, so a few units of the output rounding bound the whole: rel_err <= 1e-2 (bf16) /
2e-3 (fp16) over the tensor, and elementwise |out - ref| <= rtol*|ref| + atol*max|ref| with the
same constants. Measured here: ~3e-3 (bf16), ~5e-4 (fp16). A NaN (an unwritten output, or an
unmasked read of the NaN-poisoned cache tail) fails every check.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from splitserve.kernels.testing import make_paged_case, rel_err, setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

import splitserve.kernels.decode_plan as decode_plan  # noqa: E402
from splitserve.kernels import (FP8_DTYPE, alloc_split_kv_scratch, decode_attention_ref,  # noqa: E402
                                paged_decode_attention)

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
KV = {"bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
      "fp8-bf16": (torch.bfloat16, FP8_DTYPE), "fp8-fp16": (torch.float16, FP8_DTYPE)}


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert not torch.isnan(out).any(), "NaN in output: unwritten rows or unmasked reads"
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"
    o, r = out.double(), ref.double()
    bound = tol * r.abs() + tol * r.abs().max()
    assert ((o - r).abs() <= bound).all(), f"max abs err {(o - r).abs().max():.3e}"


def lengths(block_size: int) -> list[int]:
    """Tile edges of the paging (1, bs-1, bs, bs+1), a long one: 7 sequences, odd batch."""
    return [1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3, 2, 77]


def run_case(seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, kv, seed,
             num_splits=None, scratch=False, v_token_minor=None):
    dtype, kv_dtype = KV[kv]
    c = make_paged_case(seq_lens, [1] * len(seq_lens), num_q_heads, num_kv_heads, head_dim,
                        block_size, dtype, kv_dtype, device=DEVICE, seed=seed,
                        v_token_minor=v_token_minor)
    ref = decode_attention_ref(c.q.cpu(), c.k_cache.cpu(), c.v_cache.cpu(),
                               c.block_tables.cpu(), c.seq_lens.cpu(), c.scale,
                               None if c.k_scale is None else c.k_scale.cpu(),
                               None if c.v_scale is None else c.v_scale.cpu())
    out = torch.full_like(c.q, float("nan"))
    buf = None
    if scratch:
        buf = alloc_split_kv_scratch(c.q.shape[0], num_q_heads, head_dim, num_splits,
                                     c.q.device)
        buf.part_out.fill_(float("nan"))
        buf.part_lse.fill_(float("nan"))
    got = paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens,
                                 c.scale, c.k_scale, c.v_scale, out=out,
                                 num_splits=num_splits, scratch=buf)
    assert got is out
    assert_close(out.cpu(), ref, TOL[dtype])


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 tokens and splits as short as 16 so tiny CPU cases cross every edge."""
    monkeypatch.setattr(decode_plan, "TILES_16BIT", (16, 2, 4))
    monkeypatch.setattr(decode_plan, "TILES_FP8", (16, 2, 4))
    monkeypatch.setattr(decode_plan, "MIN_CHUNK", 16)
    monkeypatch.setattr(decode_plan, "BATCH_TILES", ())
    monkeypatch.setattr(decode_plan, "LARGE_BATCH_TILES", ())


@pytest.mark.parametrize("kv", list(KV))
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])  # GQA 1, 4, 8
def test_decode_dtypes_and_gqa(kv, num_q_heads, num_kv_heads, small_tiles):
    head_dim, block_size = (64, 16) if num_kv_heads == 2 else (128, 32)
    run_case(lengths(block_size), num_q_heads, num_kv_heads, head_dim, block_size, kv,
             seed=num_q_heads * 10 + len(kv), num_splits=3)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_decode_head_dims_block_sizes_splits(head_dim, block_size, num_splits, small_tiles):
    run_case(lengths(block_size), 4, 1, head_dim, block_size, "bf16",
             seed=head_dim + block_size + num_splits, num_splits=num_splits)


@pytest.mark.parametrize("fp16_compute", [True, False])
def test_decode_fp8_compute_variants(fp16_compute, small_tiles, monkeypatch):
    """Both FP8 compute dtypes: fp16 (the default) and q's dtype."""
    monkeypatch.setattr(decode_plan, "FP8_FP16_COMPUTE", fp16_compute)
    run_case(lengths(16), 8, 2, 64, 16, "fp8-bf16", seed=12, num_splits=4)


@pytest.mark.parametrize("hpp", [2, 4])
@pytest.mark.parametrize("kv,num_q_heads,num_kv_heads", [
    ("bf16", 16, 4), ("fp8-bf16", 16, 4), ("fp16", 4, 4), ("fp8-fp16", 24, 8)])
def test_decode_several_kv_heads_per_program(hpp, kv, num_q_heads, num_kv_heads, small_tiles,
                                             monkeypatch):
    """HPP kv heads per program (rows = their query heads, a row masked to its own head's
    columns): GQA 4 (16 rows, no padding at HPP 4), GQA 1, GQA 3; FP8 with a distinct scale
    per kv head, so a row reading another head's scale or keys fails."""
    monkeypatch.setattr(decode_plan, "HPP_16BIT", hpp)
    monkeypatch.setattr(decode_plan, "HPP_FP8", hpp)
    for num_splits in (1, 3):
        run_case(lengths(16), num_q_heads, num_kv_heads, 64, 16, kv,
                 seed=hpp * 100 + num_q_heads + num_splits, num_splits=num_splits)


@pytest.mark.parametrize("kv,v_token_minor,hpp", [
    ("fp8-bf16", False, 1), ("fp8-fp16", False, 2), ("bf16", True, 1), ("fp16", True, 2),
    ("fp8-bf16", True, 4)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_both_v_page_layouts(kv, v_token_minor, hpp, block_size, small_tiles, monkeypatch):
    """Either V page layout with either cache dtype (FP8 defaults to token-minor, 16-bit to
    token-major): a page of 32 tokens is longer than the 16-token tile; with HPP > 1 the tile's
    columns are head-major for token-minor pages."""
    monkeypatch.setattr(decode_plan, "HPP_16BIT", hpp)
    monkeypatch.setattr(decode_plan, "HPP_FP8", hpp)
    for num_splits in (1, 3):
        run_case(lengths(block_size), 4 * 4, 4, 64, block_size, kv, seed=hpp + block_size + num_splits,
                 num_splits=num_splits, v_token_minor=v_token_minor)


def test_heads_per_program_divides_kv_heads(monkeypatch):
    monkeypatch.setattr(decode_plan, "HPP_FP8", 4)
    assert [decode_plan.heads_per_program(n, True) for n in (1, 2, 3, 6, 8)] == [1, 2, 3, 3, 4]
    assert decode_plan.heads_per_program(8, False) == decode_plan.HPP_16BIT


def test_launch_shape_by_batch(monkeypatch):
    monkeypatch.setattr(decode_plan, "HPP_FP8", 1)
    monkeypatch.setattr(decode_plan, "BATCH_TILES", ((16, False, (128, 5, 4), 1),
                                                     (128, True, (64, 5, 4), 2)))
    assert decode_plan.launch_shape(1, 8, False) == ((128, 5, 4), 1)
    assert decode_plan.launch_shape(64, 8, False) == (decode_plan.TILES_16BIT, 1)
    assert decode_plan.launch_shape(8, 8, True) == ((64, 5, 4), 2)
    assert decode_plan.launch_shape(8, 3, True) == ((64, 5, 4), 1)    # 2 does not divide 3
    assert decode_plan.launch_shape(64, 8, True) == (decode_plan.TILES_FP8, 1)
    monkeypatch.setattr(decode_plan, "LARGE_BATCH_TILES", ((1024, False, (16, 5, 4), 4),
                                                           (512, True, (32, 5, 4), 4)))
    assert decode_plan.launch_shape(127, 8, False) == (decode_plan.TILES_16BIT, 1)
    assert decode_plan.launch_shape(128, 8, False) == ((16, 5, 4), 4)
    assert decode_plan.launch_shape(64, 8, True) == ((32, 5, 4), 4)
    assert decode_plan.launch_shape(256, 6, True) == ((32, 5, 4), 3)   # 4 does not divide 6


@pytest.mark.parametrize("kv", ["bf16", "fp8-bf16"])
def test_decode_large_batch_tiles(kv, monkeypatch):
    """The shipped large-grid tiles (four kv heads per program, short tiles), forced onto a
    small case: equal to the reference across page edges and splits."""
    monkeypatch.setattr(decode_plan, "MIN_CHUNK", 16)
    monkeypatch.setattr(decode_plan, "BATCH_TILES", ())
    monkeypatch.setattr(decode_plan, "LARGE_BATCH_TILES",
                        tuple((1,) + t[1:] for t in decode_plan.LARGE_BATCH_TILES))
    for splits in (1, 3):
        run_case([1, 31, 32, 33, 70], 16, 4, 128, 32, kv, seed=11 + splits, num_splits=splits)


@pytest.mark.parametrize("kv,hpp", [("bf16", 1), ("fp8-bf16", 1), ("fp8-fp16", 2)])
def test_decode_fused_split_merge(kv, hpp, small_tiles, monkeypatch):
    """The last split merges in the decode launch: equal to the reference for several split
    counts, calls in a row through one scratch (its counters must come back to zero), and
    rows with empty splits (short sequences beside long ones)."""
    monkeypatch.setattr(decode_plan, "FUSED_MERGE_MAX_SPLITS", 64)
    monkeypatch.setattr(decode_plan, "HPP_16BIT", hpp)
    monkeypatch.setattr(decode_plan, "HPP_FP8", hpp)
    dtype, kv_dtype = KV[kv]
    seq_lens = [1, 15, 16, 17, 90, 200]
    for num_splits in (2, 5, 13):
        c = make_paged_case(seq_lens, [1] * len(seq_lens), 8, 2, 64, 16, dtype, kv_dtype,
                            device=DEVICE, seed=num_splits)
        scratch = alloc_split_kv_scratch(len(seq_lens), 8, 64, num_splits, c.q.device)
        cpu = [t.cpu() for t in (c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens)]
        ref = decode_attention_ref(*cpu, c.scale, None if c.k_scale is None else c.k_scale.cpu(),
                                   None if c.v_scale is None else c.v_scale.cpu())
        for _ in range(2):
            out = torch.full_like(c.q, float("nan"))
            paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens,
                                   c.scale, c.k_scale, c.v_scale, out=out,
                                   num_splits=num_splits, scratch=scratch)
            assert_close(out.cpu(), ref, TOL[dtype])
            assert (scratch.counters == 0).all(), "counters not re-armed"


def test_decode_default_tiles_and_planned_splits():
    """The shipped tile sizes and the split planner (no monkeypatching)."""
    run_case([1, 15, 16, 17, 300], 8, 2, 64, 16, "fp8-bf16", seed=3)


def test_planned_splits_stay_within_the_fused_merge(monkeypatch):
    """The planner never picks more splits than the decode launch merges itself (a second
    merge launch measured slower on the H200), whatever the table's width; without the fused
    merge it may split further. A fake device with 132 SMs (the H200's) makes it plan as there."""
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(decode_plan, "sm_count", lambda d: 132)
    plan = lambda: decode_plan.plan_decode_splits(1, 8, 8448, dev)   # noqa: E731  (B=1, 8k table)
    assert plan() == decode_plan.FUSED_MERGE_MAX_SPLITS == 16
    # FP8 one kv head per program (batch 1): up to 32, merged in the launch for 4 q heads per kv
    # head (4 x 32 x 128 = MERGE_MAX_ELEMENTS); two heads per program (batch 3-16) stay at 16
    assert decode_plan.plan_decode_splits(1, 8, 8448, dev, fp8=True) == 32
    assert decode_plan.plan_decode_splits(3, 8, 8448, dev, fp8=True) == 16
    monkeypatch.setattr(decode_plan, "FUSED_MERGE_MAX_SPLITS", 0)
    assert plan() == 33                      # 2 programs per SM over 8 kv heads
    assert decode_plan.plan_decode_splits(1, 8, 1024, dev) == 1024 // decode_plan.MIN_CHUNK  # short


def test_planned_splits_fill_whole_waves(monkeypatch):
    """The split count rounds down to whole waves of PROGRAMS_PER_SM programs per SM: a grid
    one and a half waves deep runs its last programs alone (B=32 FP8 on the H200: 3 splits
    190 us vs 2 splits 144 us at 8k)."""
    dev = torch.device("cuda", 0)
    monkeypatch.setattr(decode_plan, "sm_count", lambda d: 132)
    slots = decode_plan.PROGRAMS_PER_SM * 132
    for seqs, fp8 in ((32, True), (32, False), (8, False), (8, True), (128, True), (3, False)):
        splits = decode_plan.plan_decode_splits(seqs, 8, 65536, dev, fp8=fp8)
        programs = seqs * 8 // decode_plan.launch_shape(seqs, 8, fp8)[1]
        assert programs * splits <= max(slots, programs), (seqs, fp8, splits)
        assert splits == 1 or programs * (splits + 1) > slots, (seqs, fp8, splits)
    assert decode_plan.plan_decode_splits(32, 8, 8192, dev, fp8=True) == 2


def test_decode_preallocated_scratch(small_tiles):
    run_case([33, 1, 70], 4, 2, 64, 16, "fp16", seed=4, num_splits=4, scratch=True)


def test_decode_zero_length_rows_are_zero(small_tiles):
    """seq_len 0 (a CUDA-graph padding row) yields zeros, not NaN, for any split count."""
    for num_splits in (1, 3):
        c = make_paged_case([0, 20, 0], [1, 1, 1], 4, 2, 64, 16, torch.bfloat16,
                            torch.bfloat16, device=DEVICE, seed=5)
        out = torch.full_like(c.q, float("nan"))
        paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens, c.scale,
                               out=out, num_splits=num_splits)
        assert (out[0] == 0).all() and (out[2] == 0).all()
        assert not torch.isnan(out[1]).any()


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 90), min_size=1, max_size=5), st.integers(1, 6),
       st.sampled_from(["bf16", "fp16", "fp8-bf16"]))
def test_decode_random_batches(seq_lens, num_splits, kv):
    """Random lengths (0 = padding row) and split counts under the small tiles."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_plan, "TILES_16BIT", (16, 2, 4))
        mp.setattr(decode_plan, "TILES_FP8", (16, 2, 4))
        mp.setattr(decode_plan, "MIN_CHUNK", 16)
        mp.setattr(decode_plan, "BATCH_TILES", ())
        dtype, kv_dtype = KV[kv]
        c = make_paged_case(seq_lens, [1] * len(seq_lens), 4, 2, 64, 16, dtype, kv_dtype,
                            device=DEVICE, seed=sum(seq_lens) + num_splits)
        out = torch.full_like(c.q, float("nan"))
        paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens,
                               c.scale, c.k_scale, c.v_scale, out=out, num_splits=num_splits)
    live = [i for i, n in enumerate(seq_lens) if n > 0]
    assert (out[[i for i, n in enumerate(seq_lens) if n == 0]] == 0).all()
    if live:
        idx = torch.tensor(live)
        cpu = [t.cpu() for t in (c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens)]
        ref = decode_attention_ref(cpu[0][idx], cpu[1], cpu[2], cpu[3][idx], cpu[4][idx],
                                   c.scale, None if c.k_scale is None else c.k_scale.cpu(),
                                   None if c.v_scale is None else c.v_scale.cpu())
        assert_close(out.cpu()[idx], ref, TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("kv", ["bf16", "fp8-fp16"])
def test_decode_long_context(kv):
    """A few thousand tokens through the default tiles and planner."""
    run_case([2049, 3000, 1], 8, 1, 128, 16, kv, seed=6)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_decode_and_write_kv_capture_in_a_cuda_graph():
    """Capture write_kv + decode once; replays follow new seq_lens / slots / q values."""
    from splitserve.kernels import write_kv

    c = make_paged_case([40, 300, 7], [1, 1, 1], 8, 2, 128, 16, torch.bfloat16, FP8_DTYPE,
                        device=DEVICE, seed=11)
    k_new = torch.randn(3, 2, 128, device=DEVICE).to(torch.bfloat16)
    v_new = torch.randn(3, 2, 128, device=DEVICE).to(torch.bfloat16)
    slots = torch.full((3,), -1, dtype=torch.int64, device=DEVICE)
    out = torch.empty_like(c.q)
    num_splits = decode_plan.plan_decode_splits(3, 2, c.block_tables.shape[1] * 16, c.q.device)
    scratch = alloc_split_kv_scratch(3, 8, 128, num_splits, c.q.device)

    def step():
        write_kv(k_new, v_new, c.k_cache, c.v_cache, slots, c.k_scale, c.v_scale)
        paged_decode_attention(c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens, c.scale,
                               c.k_scale, c.v_scale, out=out, num_splits=num_splits,
                               scratch=scratch)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                       # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lens in ([41, 300, 8], [1, 17, 2]):
        c.seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        c.q.copy_(torch.randn_like(c.q, dtype=torch.float32))
        # each seq's new token goes to position new_len - 1 (within its allocated blocks)
        pos = torch.tensor(new_lens, device=DEVICE) - 1
        slots.copy_(c.block_tables[torch.arange(3, device=DEVICE), pos // 16].long() * 16
                    + pos % 16)
        out.fill_(float("nan"))
        graph.replay()
        cpu = [t.cpu() for t in (c.q, c.k_cache, c.v_cache, c.block_tables, c.seq_lens)]
        ref = decode_attention_ref(*cpu, c.scale, c.k_scale.cpu(), c.v_scale.cpu())
        assert_close(out.cpu(), ref, TOL[torch.bfloat16])
