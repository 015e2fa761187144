#!/usr/bin/env python3
"""Experiment (issue 3): a batch-1 paged decode written in Gluon, to see whether explicit
layouts shorten the dependent chain that keeps the Triton kernel's B=1 x 4k row at 2.5x the
bandwidth ideal (bench/results/kernels.md, session 19). Not a shipped kernel: Gluon kernels do
not run under TRITON_INTERPRET, so it is checked against the torch reference on the GPU only.

    python3 bench/gluon_b1_decode.py --out $OUT          # H200 (Triton >= 3.6)
    python3 bench/gluon_b1_decode.py --compile-only      # no GPU: registers, spills, SASS ops

Design (one program per (kv head, split); bf16 cache [blocks, 16, kv heads, 128], 4 q heads
per kv head):
- each of the 4 warps owns a quarter of the split's keys end to end: its K/V rows are copied
  by its own threads (cp.async), its scores are a batched tensor-core dot ([warp, 16 rows,
  keys]: q rows 4..15 are padding), its softmax stays inside the warp, and P goes to the P.V
  dot in registers; the warps' partial results meet once, at the end;
- the block table and seq_len are read before the PDL wait; after it, q is loaded straight
  into the dot's register layout (no shared memory) and then every K/V copy is issued (with
  q after the copies ptxas placed part of q's loads behind the K wait; the same time);
- splits merge in the same launch: partial + log-sum-exp to scratch, one acq_rel counter
  bump per program, the last one merges (as kernels/decode_attention.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
import triton.language as tl

GROUP = gl.constexpr(4)
PAGE = gl.constexpr(16)
WARPS = 4


@gluon.jit
def _pdl_wait():
    tl.extra.cuda.gdc_wait()


@gluon.jit
def _pdl_launch():
    tl.extra.cuda.gdc_launch_dependents()


@gluon.jit
def _warp_sync():
    """After a cp.async wait: each warp reads only the rows its own threads copied, so a warp
    barrier orders them (Gluon 3.6 still inserts a CTA barrier before the shared loads)."""
    tl.inline_asm_elementwise("bar.warp.sync -1; // $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _b1_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_out_ptr,
                      part_lse_ptr, counters_ptr, qk_scale_log2, stride_kb, stride_ko,
                      num_splits, CHUNK: gl.constexpr, PDL: gl.constexpr,
                      MERGE_S: gl.constexpr, MERGE: gl.constexpr = True):
    KW: gl.constexpr = CHUNK // 4                       # keys per warp
    D: gl.constexpr = 128
    kvh = gl.program_id(0)
    split = gl.program_id(1)

    # register layouts: a batched tensor-core dot with one warp per batch entry
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1],
                                                   instr_shape=[1, 16, 8])
    a_op: gl.constexpr = gl.DotOperandLayout(0, mma, 2)
    b_op: gl.constexpr = gl.DotOperandLayout(1, mma, 2)
    # the copies: each warp its own [KW, D] slab, 16 bytes per thread and copy
    cp: gl.constexpr = gl.BlockedLayout([1, 1, 8], [1, 2, 16], [4, 1, 1], [2, 1, 0])
    smem_l: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [2, 1, 0])

    seq_len = gl.load(seq_lens_ptr)
    start = split * CHUNK
    end = gl.minimum(start + CHUNK, seq_len)

    w_c = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, cp)))
    t_c = gl.arange(0, KW, layout=gl.SliceLayout(0, gl.SliceLayout(2, cp)))
    d_c = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, cp)))
    pos = start + w_c[:, None] * KW + t_c[None, :]                     # [4, KW]
    valid = pos < end
    blk = gl.load(bt_ptr + pos // PAGE, mask=valid, other=0).to(gl.int64)
    row = blk * stride_kb + (pos % PAGE).to(gl.int64) * stride_ko + kvh * D
    row = gl.multiple_of(row, [8, 8])          # whole 16-byte runs of a token's head row
    offs = row[:, :, None] + d_c[None, None, :]                        # [4, KW, D]
    vmask = valid[:, :, None]

    if PDL:
        _pdl_wait()
    # q rows (4 real of 16) in the A-operand layout, the same for every warp
    w_a = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, a_op)))
    r_a = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, a_op)))
    d_a = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, a_op)))
    q_rows = (w_a[:, None] * 0 + r_a[None, :])                         # [4, 16]
    q_off = (kvh * GROUP + q_rows)[:, :, None] * D + d_a[None, None, :]
    q = gl.load(q_ptr + q_off, mask=(q_rows < GROUP)[:, :, None] & (d_a[None, None, :] < D),
                other=0.0)

    k_s = gl.allocate_shared_memory(gl.bfloat16, [4, KW, D], smem_l)
    v_s = gl.allocate_shared_memory(gl.bfloat16, [4, KW, D], smem_l)
    async_copy.async_copy_global_to_shared(k_s, k_ptr + offs, mask=vmask)
    async_copy.commit_group()
    async_copy.async_copy_global_to_shared(v_s, v_ptr + offs, mask=vmask)
    async_copy.commit_group()

    async_copy.wait_group(1)
    _warp_sync()
    kt = k_s.permute([0, 2, 1]).load(b_op)                              # [4, D, KW]
    s = mma_v2(q, kt, gl.zeros([4, 16, KW], gl.float32, mma))
    # mask keys past the end
    w_s = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(1, mma)))
    t_s = gl.arange(0, KW, layout=gl.SliceLayout(0, gl.SliceLayout(1, mma)))
    pos_s = start + w_s[:, None] * KW + t_s[None, :]                  # [4, KW]
    s = gl.where((pos_s < end)[:, None, :], s * qk_scale_log2, float("-inf"))
    m = gl.max(s, 2)                                                  # [4, 16]
    m_safe = gl.where(m == float("-inf"), 0.0, m)
    p = gl.exp2(s - m_safe[:, :, None])
    l = gl.sum(p, 2)
    p_op = gl.convert_layout(p.to(gl.bfloat16), a_op, assert_trivial=True)

    async_copy.wait_group(0)
    _warp_sync()
    v = v_s.load(b_op)                                                # [4, KW, D]
    o = mma_v2(p_op, v, gl.zeros([4, 16, D], gl.float32, mma))
    if PDL:
        _pdl_launch()

    # the four warps' partials -> this split's (o, lse), rows 0..15 (0..3 real)
    m_all = gl.max(m, 0)                                              # [16]
    has = m_all > float("-inf")
    m_all = gl.where(has, m_all, 0.0)
    wt = gl.exp2(m - m_all[None, :])                                  # [4, 16] (0 for empty)
    l_all = gl.sum(l * wt, 0)
    o_all = gl.sum(o * wt[:, :, None], 0)                             # [16, D]
    rl: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(0, mma))     # rows of o_all
    l_all = gl.convert_layout(l_all, rl)
    m_all = gl.convert_layout(m_all, rl)
    has = l_all > 0.0
    o_all = o_all / gl.where(has, l_all, 1.0)[:, None]
    lse = gl.where(has, m_all + gl.log2(gl.where(has, l_all, 1.0)), float("-inf"))

    ol: gl.constexpr = gl.SliceLayout(0, mma)
    r_o = gl.arange(0, 16, layout=gl.SliceLayout(1, ol))
    d_o = gl.arange(0, D, layout=gl.SliceLayout(0, ol))
    heads = kvh * GROUP + r_o
    rows = heads * num_splits + split                                 # seq 0 only
    rmask = r_o < GROUP
    gl.store(part_out_ptr + rows[:, None] * D + d_o[None, :], o_all,
             mask=rmask[:, None] & (d_o[None, :] < D))
    gl.store(part_lse_ptr + rows, lse, mask=rmask)
    if MERGE:
        _count_and_merge(part_out_ptr, part_lse_ptr, out_ptr, counters_ptr, kvh, num_splits,
                         MERGE_S)


@gluon.jit
def _count_and_merge(part_out_ptr, part_lse_ptr, out_ptr, counters_ptr, kvh, num_splits,
                     MERGE_S: gl.constexpr):
    gl.thread_barrier()
    counter = counters_ptr + kvh
    if gl.atomic_add(counter, 1, sem="acq_rel") == num_splits - 1:
        _merge(part_out_ptr, part_lse_ptr, out_ptr, kvh, num_splits, MERGE_S)
        gl.atomic_xchg(counter, 0, sem="relaxed")


@gluon.jit
def _merge(part_out_ptr, part_lse_ptr, out_ptr, kvh, num_splits, MERGE_S: gl.constexpr):
    D: gl.constexpr = 128
    ml: gl.constexpr = gl.BlockedLayout([1, 1, 4], [1, 1, 32], [4, 1, 1], [2, 1, 0])
    r = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, ml)))
    sp = gl.arange(0, MERGE_S, layout=gl.SliceLayout(0, gl.SliceLayout(2, ml)))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, ml)))
    rows = (kvh * GROUP + r) * num_splits
    m2 = (r < GROUP)[:, None] & (sp < num_splits)[None, :]
    lse = gl.load(part_lse_ptr + rows[:, None] + sp[None, :], mask=m2, other=float("-inf"),
                  cache_modifier=".cg")
    po = gl.load(part_out_ptr + (rows[:, None, None] + sp[None, :, None]) * D + d[None, None, :],
                 mask=m2[:, :, None] & (d[None, None, :] < D), other=0.0, cache_modifier=".cg")
    mx = gl.max(lse, 1)
    mx = gl.where(mx == float("-inf"), 0.0, mx)
    w = gl.exp2(lse - mx[:, None])
    den = gl.sum(w, 1)
    ol: gl.constexpr = gl.SliceLayout(1, ml)
    den = gl.convert_layout(den, gl.SliceLayout(1, ol))
    o = gl.sum(w[:, :, None] * po, 1) / gl.where(den > 0.0, den, 1.0)[:, None]
    r2 = gl.arange(0, 4, layout=gl.SliceLayout(1, ol))
    d2 = gl.arange(0, D, layout=gl.SliceLayout(0, ol))
    gl.store(out_ptr + (kvh * GROUP + r2)[:, None] * D + d2[None, :], o.to(gl.bfloat16))


def compile_only(chunk: int, out: Path) -> None:
    """Compile for sm_90 without a GPU; print shared bytes, registers/spills and SASS ops, and
    write the SASS to out."""
    from triton.experimental.gluon._runtime import GluonASTSource
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sm90_sass import compile_sm90, sass_ops
    sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "bt_ptr": "*i32",
           "seq_lens_ptr": "*i32", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
           "part_lse_ptr": "*fp32", "counters_ptr": "*i32", "qk_scale_log2": "fp32",
           "stride_kb": "i64", "stride_ko": "i64", "num_splits": "i32",
           "CHUNK": "constexpr", "PDL": "constexpr", "MERGE_S": "constexpr"}
    src = GluonASTSource(_b1_decode_kernel, sig,
                         constexprs={"CHUNK": chunk, "PDL": 1, "MERGE_S": 16},
                         attrs={(i,): [["tt.divisibility", 16]] for i in range(12)})
    ck, sass, resources = compile_sm90(src, WARPS)
    print(f"CHUNK {chunk}: shared {ck.metadata.shared} B; {resources}")
    print(dict(sass_ops(sass, base=True).most_common(30)))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gluon-b1-c{chunk}.sass").write_text(sass)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--chunks", type=int, nargs="*", default=[128, 256])
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.compile_only:
        for chunk in args.chunks:
            compile_only(chunk, Path(args.out))
        return
    run_gpu(args)


def run_gpu(args) -> None:
    """Correctness against the float32 reference, then graph timing against the Triton
    kernel (kernels/decode_attention.py with its plan), interleaved in one process."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kbench import HKV, HQ, D, K, bench_graph  # noqa: E402
    from kernels import Paged  # noqa: E402  (bench/kernels.py)

    def next_pow2(n):
        return 1 << (n - 1).bit_length()

    rows = []
    for L in args.lengths:
        sets = max(1, (96 << 20) // (4096 * L))
        p = Paged(1, L, "bf16", sets=sets, seed=L, page=PAGE.value)
        splits_t = K.plan_decode_splits(1, HKV, L, p.q.device)
        outs = [torch.empty_like(p.q) for _ in range(sets)]
        scr = [K.alloc_split_kv_scratch(1, HQ, D, splits_t, p.q.device) if splits_t > 1 else None
               for _ in range(sets)]

        def triton_call(i):
            K.paged_decode_attention(p.q, p.k_cache, p.v_cache, p.tables[i], p.seq_lens,
                                     D ** -0.5, out=outs[i], num_splits=splits_t,
                                     scratch=scr[i])

        def triton_nopdl(i):
            os.environ["SPLITSERVE_PDL"] = "0"
            try:
                triton_call(i)
            finally:
                os.environ.pop("SPLITSERVE_PDL")

        variants = {"triton": [lambda i=i: triton_call(i) for i in range(sets)],
                    "triton_nopdl": [lambda i=i: triton_nopdl(i) for i in range(sets)]}
        for chunk, merge, pdl in [(c, m, d) for c in args.chunks for m in (1, 0) for d in (1, 0)]:
            splits = -(-L // chunk)
            if splits > 32:
                continue
            g_scr = [K.alloc_split_kv_scratch(1, HQ, D, splits, p.q.device)
                     for _ in range(sets)]

            def gluon_call(i, chunk=chunk, splits=splits, g_scr=g_scr, merge=merge, pdl=pdl):
                po, pl, cnt = g_scr[i]
                _b1_decode_kernel[(HKV, splits)](
                    p.q, p.k_cache, p.v_cache, p.tables[i], p.seq_lens, outs[i], po, pl, cnt,
                    D ** -0.5 * 1.4426950408889634, p.k_cache.stride(0), p.k_cache.stride(1),
                    splits, CHUNK=chunk, PDL=pdl, MERGE_S=max(2, next_pow2(splits)),
                    MERGE=bool(merge), num_warps=WARPS, launch_pdl=bool(pdl))
            name = f"gluon_c{chunk}" + ("" if merge else "_nomerge") + ("" if pdl else "_nopdl")
            for i in range(2 if merge else 0):
                outs[0].fill_(float("nan"))
                gluon_call(0)
                err = p.check(outs[0])
                ok = (g_scr[0].counters == 0).all().item()
                print(f"L={L} gluon chunk {chunk} ({splits} splits): rel err {err:.2e}, "
                      f"counters re-armed {ok}", flush=True)
                if not err < 2e-2 or not ok:
                    raise SystemExit("gluon kernel wrong")
            variants[name] = [lambda i=i, f=gluon_call: f(i) for i in range(sets)]
        triton_call(0)
        print(f"L={L} triton ({splits_t} splits): rel err {p.check(outs[0]):.2e}", flush=True)
        for rep in range(args.passes):
            for name, fns in variants.items():
                us = bench_graph(fns)
                rows.append(dict(L=L, variant=name, rep=rep, us=us))
                print(f"L={L} {name:>12} pass {rep}: {us:7.2f} us", flush=True)
        del p
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        k = (r["L"], r["variant"])
        best[k] = min(best.get(k, 1e9), r["us"])
    for k, v in sorted(best.items()):
        print(f"best L={k[0]} {k[1]:>12}: {v:7.2f} us")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gluon-b1.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "commit": os.environ.get("GIT_COMMIT", ""),
         "triton": triton.__version__, "args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
