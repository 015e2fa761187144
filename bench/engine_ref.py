"""The float32 reference and the transformers baseline of bench/engine.py (sections correct, hf).

correct: greedy tokens of the engine for mixed-length prompts vs an independent float32 eager
torch forward of the same weights (written out here, RoPE included, not taken from
engine/model.py), teacher-forced on the engine's tokens; a mismatch whose float32 margin is below
max(NEAR_TIE, 3 x the row's bf16 rounding noise) is a near-tie.
hf: transformers LlamaForCausalLM built on views of the engine's weights, static-cache generate,
eager; per-step time from two generate lengths.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)   # bench/ is not a package (see bench/engine.py)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from engine_common import (CONTEXTS, DEV, R, SMOKE, now_s, rand_prompt, sync,  # noqa: E402
                           write_json)
from timing import timed  # noqa: E402
import torch  # noqa: E402  (after engine_common: --smoke sets TRITON_INTERPRET first)
from splitserve.engine.request import SamplingParams  # noqa: E402

NEAR_TIE = 0.1          # float32 logit margin under which a greedy mismatch is a near-tie


# ------------------------------------------------------------------ correctness
def llama3_inv_freq(arch) -> torch.Tensor:
    """RoPE frequencies written out independently of engine/model.py (float64)."""
    d = arch.head_dim
    inv = 1.0 / arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rs = arch.rope_scaling
    if not rs:
        return inv
    f, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    wl = 2 * torch.pi / inv
    out = inv.clone()
    for i in range(len(inv)):
        if wl[i] > old / lo:
            out[i] = inv[i] / f
        elif wl[i] >= old / hi:
            s = (old / wl[i] - lo) / (hi - lo)
            out[i] = (1 - s) * inv[i] / f + s * inv[i]
    return out


@torch.inference_mode()
def reference_logits(model, arch, tokens: list[int], first: int) -> torch.Tensor:
    """float32 eager forward of the whole sequence (no cache); logits of positions >= first."""
    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + arch.rms_norm_eps) * w.float()
    n, hq, hk, d = len(tokens), arch.num_heads, arch.num_kv_heads, arch.head_dim
    ids = torch.tensor(tokens, device=DEV)
    x = model.w["model.embed_tokens.weight"][ids].float()
    ang = torch.arange(n, device=DEV, dtype=torch.float64)[:, None] * llama3_inv_freq(arch).to(DEV)[None]
    cos, sin = ang.cos().float(), ang.sin().float()                   # [n, d/2]

    def rope(t):   # t: [n, H, d], rotate-half convention
        a, b = t[..., :d // 2], t[..., d // 2:]
        c, s = cos[:, None], sin[:, None]
        return torch.cat([a * c - b * s, b * c + a * s], -1)
    for lw in model.layers:
        h = norm(x, lw["ln1"])
        wq, wk, wv = lw["qkv"].float().split([hq * d, hk * d, hk * d])
        q = rope((h @ wq.T).view(n, hq, d)).transpose(0, 1)
        k = rope((h @ wk.T).view(n, hk, d)).transpose(0, 1).repeat_interleave(hq // hk, 0)
        v = (h @ wv.T).view(n, hk, d).transpose(0, 1).repeat_interleave(hq // hk, 0)
        s = (q @ k.transpose(1, 2)) * d ** -0.5
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=DEV).triu(1), float("-inf"))
        o = (s.softmax(-1) @ v).transpose(0, 1).reshape(n, hq * d)
        x = x + o @ lw["o"].float().T
        h = norm(x, lw["ln2"])
        g, u = (h @ lw["gate_up"].float().T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(g) * u) @ lw["down"].float().T
    x = norm(x[first:], model.w["model.norm.weight"])
    return x @ model.lm_head.float().T


class _CausalSDPA:
    """Plain causal attention over one whole sequence (no cache): the engine model's own bf16
    eager logits, used only to measure how far bf16 rounding moves the logits."""
    def forward(self, layer, q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True)
        return o.transpose(0, 1).contiguous()


def bench_correct(args) -> None:
    eng = args.eng
    gen = torch.Generator().manual_seed(1)
    lens = (5, 33, 17, 70, 2) if SMOKE else (13, 100, 257, 611, 1000, 31)
    new = 8 if SMOKE else 12
    prompts = [rand_prompt(gen, n, eng.arch.vocab_size) for n in lens]
    outs = eng.generate(prompts, SamplingParams(max_tokens=new, ignore_eos=True))
    rows, match, ties, bad, margins, noises = [], 0, 0, 0, [], []
    for p, o in zip(prompts, outs):
        seq = p + o.token_ids
        ref = reference_logits(eng.model, eng.arch, seq[:-1], len(p) - 1)        # [new, V]
        ids = torch.tensor(seq[:-1], device=DEV)
        low = eng.model.forward(ids, torch.arange(len(ids), device=DEV), _CausalSDPA())[len(p) - 1:]
        noise = (low - ref).pow(2).mean(-1).sqrt()          # rms bf16-vs-f32 logit error per row
        top2 = ref.topk(2, dim=-1)
        for j, tok in enumerate(o.token_ids):
            best = int(top2.indices[j, 0])
            margins.append(float(top2.values[j, 0] - top2.values[j, 1]))
            if tok == best:
                match += 1
                continue
            gap = float(ref[j, best] - ref[j, tok])
            tol = max(NEAR_TIE, 3 * float(noise[j]))
            kind = "near-tie" if gap < tol else "MISMATCH"
            ties += kind == "near-tie"
            bad += kind == "MISMATCH"
            rows.append({"prompt_len": len(p), "step": j, "engine": tok, "ref": best, "gap": gap,
                         "tol": tol, "kind": kind})
        noises.append(float(noise.mean()))
    R["correctness"] = {"prompt_lens": lens, "new_tokens": new, "tokens": match + ties + bad, "match": match,
                        "near_ties": ties, "mismatches": bad, "near_tie_margin": f"max({NEAR_TIE}, 3 x rms(bf16 eager - f32 logits) of the row)",
                        "rms_bf16_logit_error": statistics.mean(noises) if noises else None,
                        "median_top2_margin": statistics.median(margins), "details": rows, "passed": bad == 0}
    print(f"correctness: {match}/{match + ties + bad} equal, {ties} near-ties, {bad} mismatches "
          f"(median float32 top-2 margin {statistics.median(margins):.3f}) {rows}", flush=True)


# ------------------------------------------------------------------ transformers baseline
def hf_model(model, arch):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                      intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                      num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                      head_dim=arch.head_dim, rope_theta=arch.rope_theta, rope_scaling=arch.rope_scaling,
                      rms_norm_eps=arch.rms_norm_eps, max_position_embeddings=arch.max_position_embeddings,
                      tie_word_embeddings=arch.tie_word_embeddings)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    q, kv = arch.q_size, arch.kv_size
    sd = {"model.embed_tokens.weight": model.w["model.embed_tokens.weight"],
          "model.norm.weight": model.w["model.norm.weight"], "lm_head.weight": model.lm_head}
    for i, lw in enumerate(model.layers):   # views into the engine's fused tensors: no copy
        p = f"model.layers.{i}."
        wq, wk, wv = lw["qkv"].split([q, kv, kv])
        g, u = lw["gate_up"].chunk(2)
        sd.update({p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk,
                   p + "self_attn.v_proj.weight": wv, p + "self_attn.o_proj.weight": lw["o"],
                   p + "mlp.gate_proj.weight": g, p + "mlp.up_proj.weight": u,
                   p + "mlp.down_proj.weight": lw["down"], p + "input_layernorm.weight": lw["ln1"],
                   p + "post_attention_layernorm.weight": lw["ln2"]})
    hf.load_state_dict(sd, assign=True, strict=False)
    with torch.device(DEV):                       # rebuild the rotary buffers left on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)
    return hf.eval()


@torch.inference_mode()
def bench_hf(args) -> None:
    hf = hf_model(args.model, args.arch)
    # transformers 5 torch.compiles static-cache decoding on CUDA by default; the first device run
    # (2026-11-29) spent its whole time budget recompiling (1.9 s/step at B=1): time it eager
    hf.generation_config.disable_compile = True
    R["hf"] = []
    ctx = CONTEXTS[0]
    for b in (1, 32, 8) if not SMOKE else (1, 8):   # the two of record first
        if b != 1 and now_s() > args.budget_s + 30:
            R["errors"].append(f"hf: B={b} skipped (time budget)")
            continue
        ids = torch.randint(2, args.arch.vocab_size, (b, ctx), device=DEV)
        n1, n2 = (2, 6) if SMOKE else (4, 36)

        def gen(n):
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, cache_implementation="static", pad_token_id=0)
            sync()
        gen(n1)
        t1 = timed(lambda: gen(n1), 1, warmup=0)
        t2 = timed(lambda: gen(n2), 1, warmup=0)
        step = (t2 - t1) / (n2 - n1)
        R["hf"].append({"batch": b, "context": ctx, "step_s": step, "tok_s": b / step,
                        "compiled": False})
        write_json(args)
        print(f"hf static-cache generate B={b} ctx={ctx}: {step * 1e3:.2f} ms/step {b / step:.0f} tok/s", flush=True)
