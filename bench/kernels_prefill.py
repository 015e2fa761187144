"""Prefill and extend cases of bench/kernels.py: paged_extend_attention ("paged") and
paged_prefill_attention ("new", the new tokens' q/k/v as views of one fused qkv buffer) against
torch SDPA on contiguous KV, their tile sweeps (--tune) and the prefill/extend markdown table.

Imported by bench/kernels.py (which puts bench/ on sys.path); state is shared through kbench:
RESULTS, and the tile settings on the EXTEND / PREFILL kernel modules.
"""
from __future__ import annotations

import types

import torch

from kbench import (D, DEV, EXTEND, HKV, HQ, K, PAGE, PREFILL, RESULTS, SMOKE, TESTING, _pick,
                    bench, section)


def extend_problem(B: int, ctx: int, q_len: int, kv: str, seed: int):
    return TESTING.make_paged_case([ctx + q_len] * B, [q_len] * B, HQ, HKV, D, PAGE,
                                   torch.bfloat16, torch.bfloat16 if kv == "bf16" else K.FP8_DTYPE,
                                   device="cpu", seed=seed)


def to_dev(c):
    for f in ("q", "k_cache", "v_cache", "query_start_loc", "seq_lens", "block_tables",
              "k_scale", "v_scale"):
        t = getattr(c, f)
        if t is not None:
            setattr(c, f, t.to(DEV))
    return c


def gpu_case(B: int, ctx: int, q_len: int, kv: str, seed: int):
    """Like make_paged_case but generated on the GPU (fast for 16k tokens); no NaN tails."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    S = ctx + q_len
    nblk = (S + PAGE - 1) // PAGE
    shape = (B * nblk, PAGE, HKV, D)
    if kv == "fp8":
        kc = (torch.randn(shape, device=DEV, generator=g) * 40).clamp(-448, 448).to(K.FP8_DTYPE)
        vc = K.token_minor_v(  # the engine's FP8 V pages
            (torch.randn(shape, device=DEV, generator=g) * 40).clamp(-448, 448).to(K.FP8_DTYPE))
        ks = torch.rand(HKV, device=DEV, generator=g) * 0.02 + 0.01
        vs = torch.rand(HKV, device=DEV, generator=g) * 0.02 + 0.01
    else:
        kc = torch.randn(shape, device=DEV, generator=g, dtype=torch.bfloat16)
        vc = torch.randn(shape, device=DEV, generator=g, dtype=torch.bfloat16)
        ks = vs = None
    tables = torch.randperm(B * nblk, device=DEV, generator=g).to(torch.int32).view(B, nblk)
    q = torch.randn(B * q_len, HQ, D, device=DEV, generator=g, dtype=torch.bfloat16)
    qsl = torch.arange(0, B + 1, device=DEV, dtype=torch.int32) * q_len
    seq_lens = torch.full((B,), S, device=DEV, dtype=torch.int32)
    return types.SimpleNamespace(q=q, k_cache=kc, v_cache=vc, query_start_loc=qsl,
                                 seq_lens=seq_lens, block_tables=tables, k_scale=ks,
                                 v_scale=vs, scale=D ** -0.5, max_query_len=q_len)


def run_extend(c, out=None):
    return K.paged_extend_attention(c.q, c.k_cache, c.v_cache, c.query_start_loc, c.seq_lens,
                                    c.block_tables, c.scale, c.k_scale, c.v_scale,
                                    max_query_len=c.max_query_len, out=out)


def fused_qkv(c, k, v, B: int, q_len: int):
    """q, k, v of the new tokens as views of one [T, (HQ + 2 HKV) * D] buffer (the engine's
    qkv projection output); k, v ([B, HKV, S, D] contiguous, for SDPA) give the new rows."""
    T = B * q_len
    buf = torch.empty(T, (HQ + 2 * HKV) * D, device=DEV, dtype=torch.bfloat16)
    qn = buf[:, :HQ * D].view(T, HQ, D)
    kn = buf[:, HQ * D:(HQ + HKV) * D].view(T, HKV, D)
    vn = buf[:, (HQ + HKV) * D:].view(T, HKV, D)
    qn.copy_(c.q)
    kn.copy_(k[:, :, -q_len:].transpose(1, 2).reshape(T, HKV, D))
    vn.copy_(v[:, :, -q_len:].transpose(1, 2).reshape(T, HKV, D))
    return qn, kn, vn


def run_new(c, qkv, out=None, quantize_new_kv=True):
    return K.paged_prefill_attention(qkv[0], qkv[1], qkv[2], c.k_cache, c.v_cache,
                                     c.query_start_loc, c.seq_lens, c.block_tables, c.scale,
                                     c.k_scale, c.v_scale, max_query_len=c.max_query_len,
                                     out=out, quantize_new_kv=quantize_new_kv)


NEW_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES", "USE_TMA")


def new_tiles() -> tuple:
    return tuple(getattr(PREFILL, n) for n in NEW_TILE_NAMES)


def set_new_tiles(cfg: tuple) -> None:
    for name, value in zip(NEW_TILE_NAMES, cfg):
        setattr(PREFILL, name, value)


def contiguous_kv(c, B, S):
    def gather(cache, scale):
        x = cache[c.block_tables.long()].reshape(B, -1, HKV, D)[:, :S]
        x = x.float() * scale[None, None, :, None] if scale is not None else x
        return x.to(torch.bfloat16).transpose(1, 2).contiguous()
    return gather(c.k_cache, c.k_scale), gather(c.v_cache, c.v_scale)


def sdpa_extend(q, k, v, q_len, S):
    from torch.nn.attention.bias import causal_lower_right
    if q_len == S:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                enable_gqa=True)
    # lower-right causal bias; expand GQA heads up front (the bias path may lack enable_gqa)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(q_len, S))


@section("extend")
def extend_case(B: int, ctx: int, q_len: int, kv: str, kind: str):
    c = gpu_case(B, ctx, q_len, kv, seed=ctx + q_len + B)
    S = ctx + q_len
    out = torch.full_like(c.q, float("nan"))
    run_extend(c, out)
    k, v = contiguous_kv(c, B, S)
    qkv = fused_qkv(c, k, v, B, q_len)
    qb = c.q.view(B, q_len, HQ, D).transpose(1, 2)
    if q_len != S:
        k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    ref_sd = sdpa_extend(qb, k, v, q_len, S).transpose(1, 2).reshape(-1, HQ, D)
    err_sdpa = TESTING.rel_err(out, ref_sd)
    out_new = torch.full_like(c.q, float("nan"))
    run_new(c, qkv, out_new)
    err_new_sdpa = TESTING.rel_err(out_new, ref_sd)
    err = err_new = None
    if B * q_len * S <= 4096 * 4096:   # float32 reference fits comfortably
        meta = (c.query_start_loc, c.seq_lens, c.block_tables, c.scale, c.k_scale, c.v_scale)
        err = TESTING.rel_err(out, K.paged_attention_ref(c.q, c.k_cache, c.v_cache, *meta))
        err_new = TESTING.rel_err(out_new, K.prefill_attention_ref(*qkv, c.k_cache, c.v_cache,
                                                                   *meta))
        assert err < 1e-2, f"{kind} B={B} ctx={ctx} q={q_len} {kv}: rel err {err:.2e}"
        assert err_new < 1e-2, f"{kind} B={B} ctx={ctx} q={q_len} {kv}: new rel err {err_new:.2e}"
    assert err_sdpa < 2e-2, f"{kind} vs SDPA rel err {err_sdpa:.2e}"
    assert err_new_sdpa < 2e-2, f"{kind} new kernel vs SDPA rel err {err_new_sdpa:.2e}"
    flops = 4 * B * HQ * D * q_len * (ctx + (q_len + 1) / 2)
    us = bench(lambda: run_extend(c, out))
    row = dict(B=B, ctx=ctx, q_len=q_len, kv=kv, us=us, TFLOPs=flops / us / 1e6,
               rel_err=err, rel_err_vs_sdpa=err_sdpa,
               tiles=(EXTEND.BLOCK_M, EXTEND.BLOCK_N, EXTEND.NUM_WARPS, EXTEND.NUM_STAGES))
    row["new_us"] = bench(lambda: run_new(c, qkv, out_new))
    row.update(new_TFLOPs=flops / row["new_us"] / 1e6, new_rel_err=err_new,
               new_rel_err_vs_sdpa=err_new_sdpa, new_tiles=new_tiles())
    if kv == "fp8":   # the new tokens unquantized (quantize_new_kv=False)
        row["new_unquantized_us"] = bench(lambda: run_new(c, qkv, out_new, False))
    if kv == "bf16":
        row["sdpa_us"] = bench(lambda: sdpa_extend(qb, k, v, q_len, S))
        row["sdpa_TFLOPs"] = flops / row["sdpa_us"] / 1e6
        row["ratio_vs_sdpa"] = row["sdpa_us"] / us
        row["new_ratio_vs_sdpa"] = row["sdpa_us"] / row["new_us"]
    RESULTS[kind].append(row)
    print(kind, row, flush=True)
    c = k = v = qkv = None   # free them (the timing lambdas hold them; not del: pyflakes)
    torch.cuda.empty_cache()



# ---------------------------------------------------------------- tuning
@section("tune-prefill")
def tune_prefill():
    L, ctx, q_len = (40, 40, 8) if SMOKE else (4096, 4096, 512)
    c = gpu_case(1, 0, L, "bf16", seed=4)
    ce = gpu_case(4, ctx, q_len, "bf16", seed=5)
    out, oute = torch.empty_like(c.q), torch.empty_like(ce.q)
    results = {}
    for cfg in [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (128, 128, 8, 2),
                (128, 64, 8, 3), (64, 128, 4, 3), (64, 32, 4, 4), (128, 128, 8, 3)][
                    :2 if SMOKE else None]:
        EXTEND.BLOCK_M, EXTEND.BLOCK_N, EXTEND.NUM_WARPS, EXTEND.NUM_STAGES = cfg
        try:
            t = bench(lambda: run_extend(c, out))
            te = bench(lambda: run_extend(ce, oute))
        except Exception as e:
            RESULTS["tune"].append(dict(kernel="extend", cfg=cfg, error=str(e)[:300]))
            continue
        flops = 4 * HQ * D * L * (L + 1) / 2
        flops_e = 4 * 4 * HQ * D * q_len * (ctx + (q_len + 1) / 2)
        RESULTS["tune"].append(dict(kernel="extend", cfg=cfg, prefill_us=t,
                                    prefill_TFLOPs=flops / t / 1e6, extend_us=te,
                                    extend_TFLOPs=flops_e / te / 1e6))
        results[cfg] = (t, te)
        print("tune extend", cfg, f"prefill {flops / t / 1e6:.0f} TFLOP/s, "
              f"extend {flops_e / te / 1e6:.0f} TFLOP/s", flush=True)
    best_p = min(v[0] for v in results.values())
    best_e = min(v[1] for v in results.values())
    cfg = min(results, key=lambda k: results[k][0] / best_p + results[k][1] / best_e)
    EXTEND.BLOCK_M, EXTEND.BLOCK_N, EXTEND.NUM_WARPS, EXTEND.NUM_STAGES = cfg
    RESULTS["extend_config"] = dict(BLOCK_M=cfg[0], BLOCK_N=cfg[1], NUM_WARPS=cfg[2],
                                    NUM_STAGES=cfg[3])
    c8 = gpu_case(4, ctx, q_len, "fp8", seed=6)
    out8 = torch.empty_like(c8.q)
    fp16 = {}
    for flag in (True, False):
        EXTEND.FP8_FP16_COMPUTE = flag
        fp16[flag] = bench(lambda: run_extend(c8, out8))
        RESULTS["tune"].append(dict(kernel="extend-fp8-compute", cfg=("fp16" if flag else "bf16"),
                                    extend_us=fp16[flag]))
        print("tune extend fp8 fp16-compute", flag, f"{fp16[flag]:.1f} us", flush=True)
    EXTEND.FP8_FP16_COMPUTE = fp16[True] <= fp16[False]
    RESULTS["extend_config"]["FP8_FP16_COMPUTE"] = EXTEND.FP8_FP16_COMPUTE
    print("extend config chosen:", RESULTS["extend_config"], flush=True)
    c = ce = c8 = None   # free them (the timing lambdas hold them; not del: pyflakes)
    torch.cuda.empty_cache()


@section("tune-prefill-new")
def tune_prefill_new():
    """paged_prefill_attention's tiles (NEW_TILE_NAMES) on a causal 8k prefill and a
    4 x (4096 cached + 512 new) extend; checked against SDPA per config."""
    cases = {}
    for key, (B, ctx, q_len) in (("prefill", (1, 0, 40 if SMOKE else 8192)),
                                 ("extend", (2, 40, 8) if SMOKE else (4, 4096, 512))):
        c = gpu_case(B, ctx, q_len, "bf16", seed=7)
        k, v = contiguous_kv(c, B, ctx + q_len)
        qkv = fused_qkv(c, k, v, B, q_len)
        if ctx:
            k, v = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
        ref = sdpa_extend(c.q.view(B, q_len, HQ, D).transpose(1, 2), k, v, q_len, ctx + q_len)
        flops = 4 * B * HQ * D * q_len * (ctx + (q_len + 1) / 2)
        cases[key] = (c, qkv, ref.transpose(1, 2).reshape(-1, HQ, D), flops)
        del k, v
    # all fit the H200's 227 KiB of shared memory (compiled for sm_90 with Triton 3.9)
    cfgs = [(128, 64, 8, 3, False), (128, 64, 8, 4, False), (128, 128, 8, 2, False),
            (128, 128, 8, 3, False), (64, 64, 4, 3, False), (128, 64, 4, 3, False),
            (128, 128, 8, 2, True), (128, 128, 8, 3, True), (128, 64, 8, 4, True),
            (128, 64, 8, 3, True)]
    default = new_tiles()
    for cfg in [cfgs[0], cfgs[-1]] if SMOKE else cfgs:
        set_new_tiles(cfg)
        rows = []
        try:   # e.g. out of shared memory for a config: it fails as a whole
            for key, (c, qkv, ref, flops) in cases.items():
                out = torch.full_like(c.q, float("nan"))
                run_new(c, qkv, out)
                err = TESTING.rel_err(out, ref)
                assert err < 2e-2, f"{key}: rel err {err:.2e} vs SDPA"
                t = bench(lambda: run_new(c, qkv, out))
                rows.append(dict(kernel="prefill-new", cfg=cfg, case=key, us=t,
                                 TFLOPs=flops / t / 1e6, rel_err=err))
                print("tune prefill-new", cfg, key, f"{flops / t / 1e6:.0f} TFLOP/s", flush=True)
        except Exception as e:
            RESULTS["tune"].append(dict(kernel="prefill-new", cfg=cfg,
                                        error=f"{type(e).__name__}: {str(e)[:300]}"))
            print("tune prefill-new", cfg, "failed:", str(e)[:200], flush=True)
            continue
        RESULTS["tune"].extend(rows)
    ok = any(r["kernel"] == "prefill-new" and "us" in r for r in RESULTS["tune"])
    cfg = _pick("prefill-new") if ok else default
    set_new_tiles(cfg)
    RESULTS["prefill_config"] = dict(zip(NEW_TILE_NAMES, cfg))
    print("prefill config chosen:", RESULTS["prefill_config"], flush=True)
    del cases
    if not SMOKE:
        torch.cuda.empty_cache()



# ---------------------------------------------------------------- report
def prefill_markdown() -> str:
    """The prefill/extend rows as the markdown table of bench/results/kernels.md, with the
    paged_prefill_attention ("new") columns beside paged_extend_attention ("paged")."""
    def f(r, key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else ""
    lines = ["| B | cached ctx | new tokens | kv | paged us | paged TFLOP/s | new us | "
             "new TFLOP/s | SDPA TFLOP/s | paged ratio | new ratio |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in RESULTS["prefill"] + RESULTS["extend"]:
        lines.append(f"| {r['B']} | {r['ctx']} | {r['q_len']} | {r['kv']} | {f(r, 'us', '.1f')} | "
                     f"{f(r, 'TFLOPs', '.0f')} | {f(r, 'new_us', '.1f')} | "
                     f"{f(r, 'new_TFLOPs', '.0f')} | {f(r, 'sdpa_TFLOPs', '.0f')} | "
                     f"{f(r, 'ratio_vs_sdpa', '.2f')} | {f(r, 'new_ratio_vs_sdpa', '.2f')} |")
    return "\n".join(lines) + f"\n\nnew kernel tiles: {RESULTS.get('prefill_config')}\n"
