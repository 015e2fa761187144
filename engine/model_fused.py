"""The fused forward of engine/model.py's LlamaModel: the same math, with the layer glue as
Triton kernels (splitserve.kernels.rms_norm / rope_write_kv / silu_and_mul).

Per layer: rms_norm(+residual) -> qkv GEMM -> RoPE (+ KV write) -> attention -> o GEMM ->
rms_norm(+residual) -> gate_up GEMM -> silu_and_mul -> down GEMM. The residual stream `res`
is updated in place by each norm (res <- res + sublayer output, rounded to the model dtype as
`x = x + o` rounds), so the adds cost no kernels of their own. Attention backends that define
`rope_write_kv(layer, q, k, v, positions, cos_sin)` and `attend(layer, q)` (the Triton backend)
get RoPE fused with the paged KV write; any other backend gets RoPE in place and its usual
`forward(layer, q, k, v)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class FusedForward:
    def __init__(self, model, kernels):
        self.m = model
        self.k = kernels

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn,
                logits_indices: torch.Tensor | None = None, after_layer=None) -> torch.Tensor:
        m, k, a = self.m, self.k, self.m.arch
        eps = a.rms_norm_eps
        fused_write = hasattr(attn, "rope_write_kv")
        res = F.embedding(input_ids, m.w["model.embed_tokens.weight"])       # [T, hidden], residual
        out = None                                                           # last sublayer output
        for i, lw in enumerate(m.layers):
            h = k.rms_norm(res, lw["ln1"], eps) if out is None else k.rms_norm(out, lw["ln1"], eps, residual=res)
            qkv = F.linear(h, lw["qkv"], lw["qkv_bias"])
            q, kk, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
            q = q.view(-1, a.num_heads, a.head_dim)                           # [T, Hq, D]
            kk = kk.view(-1, a.num_kv_heads, a.head_dim)                      # [T, Hkv, D]
            v = v.view(-1, a.num_kv_heads, a.head_dim)
            if fused_write:
                attn.rope_write_kv(i, q, kk, v, positions, m.cos_sin)
                if after_layer is not None:
                    after_layer(i)
                o = attn.attend(i, q)
            else:
                k.rope_write_kv(q, kk, None, positions, m.cos_sin)
                o = attn.forward(i, q, kk, v)
                if after_layer is not None:
                    after_layer(i)
            o = F.linear(o.reshape(-1, a.q_size), lw["o"])
            h = k.rms_norm(o, lw["ln2"], eps, residual=res)
            out = F.linear(k.silu_and_mul(F.linear(h, lw["gate_up"])), lw["down"])
        if logits_indices is not None:       # the final add + norm only on the rows that sample
            res, out = res[logits_indices], out[logits_indices]
        h = k.rms_norm(out, m.w["model.norm.weight"], eps, residual=res)
        return F.linear(h, m.lm_head).float()
