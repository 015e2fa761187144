"""The fused forward of engine/model.py's LlamaModel: the same math, with the layer glue as
Triton kernels (splitserve.kernels).

Per layer: rms_norm(+residual) -> qkv GEMM -> RoPE (+ KV write) -> attention -> o GEMM ->
rms_norm(+residual) -> gate_up GEMM -> silu_and_mul -> down GEMM. The residual stream `res`
is updated in place by each norm (res <- res + sublayer output, rounded to the model dtype as
`x = x + o` rounds), so the adds cost no kernels of their own. Attention backends that define
`rope_write_kv(layer, q, k, v, positions, cos_sin)` and `attend(layer, q)` (the Triton backend)
get RoPE fused with the paged KV write; any other backend gets RoPE in place and its usual
`forward(layer, q, k, v)`.

The GEMMs are cuBLAS (F.linear) except where kernels/skinny_gemm.py's table, measured on the
H200 for the weight shape and token count, has a faster Triton tile (`skinny_gemm`).

Steps of at most SMALL_BATCH_TOKENS tokens (decode at small batch, where a step is weight
streaming plus ~2 us per small kernel) run the GEMV path instead (kernels/gemv.py):
norm_linear(qkv, RoPE + KV write in its epilogue) -> attention -> gemv_linear(o) ->
norm_linear(gate_up, SiLU-mul) -> gemv_linear(down), 5 kernels per layer and no separate norm,
RoPE, SiLU or split-K reduce kernels (backends without `rope_kv_target`, or
`fuse_rope_epilogue = False`, keep the RoPE + KV-write kernel). The norms there cannot update
the residual in place (every program of the GEMV reads it), so the stream ping-pongs between
two buffers: each norm_linear reads `res` and writes res + x to the other one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SMALL_BATCH_TOKENS = 1    # steps with at most this many tokens take the GEMV path (measured on the
#                           H200: one layer's chain 121.9 vs 129.6 us at M=1, but 172.5 vs 131.2 at M=8)


class FusedForward:
    def __init__(self, model, kernels):
        self.m = model
        self.k = kernels
        self.small_batch_tokens = SMALL_BATCH_TOKENS
        self.fuse_rope_epilogue = True    # the GEMV path's QKV GEMV does RoPE + KV write
        # the Triton skinny GEMM (kernels/skinny_gemm.py) where its table says it beats cuBLAS
        # for the weight shape and token count (read at capture); False: cuBLAS everywhere
        self.skinny_gemm = True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn,
                logits_indices: torch.Tensor | None = None, after_layer=None,
                float_logits: bool = True) -> torch.Tensor:
        if input_ids.shape[0] <= self.small_batch_tokens:
            res, out = self._layers_gemv(input_ids, positions, attn, after_layer)
        else:
            res, out = self._layers(input_ids, positions, attn, after_layer)
        if logits_indices is not None:       # the final add + norm only on the rows that sample
            res, out = res[logits_indices], out[logits_indices]
        h = self.k.rms_norm(out, self.m.w["model.norm.weight"], self.m.arch.rms_norm_eps, residual=res)
        logits = F.linear(h, self.m.lm_head)
        return logits.float() if float_logits else logits

    def _layers(self, input_ids, positions, attn, after_layer) -> tuple[torch.Tensor, torch.Tensor]:
        """All layers with cuBLAS GEMMs; returns (residual stream, last sublayer output)."""
        m, k, eps = self.m, self.k, self.m.arch.rms_norm_eps
        res = F.embedding(input_ids, m.w["model.embed_tokens.weight"])       # [T, hidden], residual
        out = None                                                           # last sublayer output
        for i, lw in enumerate(m.layers):
            h = k.rms_norm(res, lw["ln1"], eps) if out is None else k.rms_norm(out, lw["ln1"], eps, residual=res)
            qkv = self._linear(h, lw["qkv"], lw["qkv_bias"])
            o = self._linear(self._attention(i, qkv, positions, attn, after_layer), lw["o"])
            h = k.rms_norm(o, lw["ln2"], eps, residual=res)
            out = self._linear(self._gate_up_silu(h, lw["gate_up"]), lw["down"])
        return res, out

    def _gate_up_silu(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """silu_and_mul(h @ gate_up.T): one skinny launch where its SiLU table has a tile."""
        tile = self.k.skinny_tile(w.shape[0], w.shape[1], h.shape[0], silu=True) if self.skinny_gemm else None
        if tile is not None:
            return self.k.skinny_linear(h, w, tile, silu=True)
        return self.k.silu_and_mul(self._linear(h, w))

    def _linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear, or the skinny Triton GEMM where its table has a tile for this shape and M."""
        if self.skinny_gemm:
            tile = self.k.skinny_tile(w.shape[0], w.shape[1], x.shape[0])
            if tile is not None:
                return self.k.skinny_linear(x, w, tile, bias=bias)
        return F.linear(x, w, bias)

    def _layers_gemv(self, input_ids, positions, attn, after_layer) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layers for few tokens with the GEMV kernels; outputs reuse one buffer each."""
        m, k, a = self.m, self.k, self.m.arch
        eps = a.rms_norm_eps
        x = F.embedding(input_ids, m.w["model.embed_tokens.weight"])         # [T, hidden]
        t, dt, dev = x.shape[0], x.dtype, x.device
        spare = (torch.empty_like(x), torch.empty_like(x))                  # residual ping-pong

        def other(r: torch.Tensor) -> torch.Tensor:
            return spare[1] if r is spare[0] else spare[0]
        qkv = torch.empty(t, a.q_size + 2 * a.kv_size, dtype=dt, device=dev)
        o = torch.empty_like(x)
        act = torch.empty(t, a.intermediate_size, dtype=dt, device=dev)
        out = torch.empty_like(x)
        fuse = self.fuse_rope_epilogue and hasattr(attn, "rope_kv_target")
        _, kk, v = self._split(qkv)     # what the QKV GEMV's RoPE epilogue writes (fuse)
        res = x                         # layer 0 norms the embedding itself: no residual add
        for i, lw in enumerate(m.layers):
            rope = attn.rope_kv_target(i, kk, v, positions, m.cos_sin) if fuse else None
            if i == 0:
                k.norm_linear(x, lw["ln1"], eps, lw["qkv"], bias=lw["qkv_bias"], out=qkv, rope=rope)
            else:
                k.norm_linear(out, lw["ln1"], eps, lw["qkv"], res, other(res), bias=lw["qkv_bias"],
                              out=qkv, rope=rope)
                res = other(res)
            k.gemv_linear(self._attention(i, qkv, positions, attn, after_layer, written=fuse),
                          lw["o"], out=o)
            k.norm_linear(o, lw["ln2"], eps, lw["gate_up"], res, other(res), silu=True, out=act)
            res = other(res)
            k.gemv_linear(act, lw["down"], out=out)
        return res, out

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D]: views of the fused qkv [T, q + 2 kv]."""
        a = self.m.arch
        q, kk, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        return (q.view(-1, a.num_heads, a.head_dim), kk.view(-1, a.num_kv_heads, a.head_dim),
                v.view(-1, a.num_kv_heads, a.head_dim))

    def _attention(self, i: int, qkv: torch.Tensor, positions: torch.Tensor, attn,
                   after_layer, written: bool = False) -> torch.Tensor:
        """RoPE, KV write and attention of layer i on the fused qkv [T, q + 2 kv]; -> [T, q_size].
        written: the QKV GEMV's epilogue did RoPE and the KV write already (rope_kv_target)."""
        m, a = self.m, self.m.arch
        q, kk, v = self._split(qkv)
        if written or hasattr(attn, "rope_write_kv"):
            if not written:
                attn.rope_write_kv(i, q, kk, v, positions, m.cos_sin)
            if after_layer is not None:
                after_layer(i)
            o = attn.attend(i, q)
        else:
            self.k.rope_write_kv(q, kk, None, positions, m.cos_sin)
            o = attn.forward(i, q, kk, v)
            if after_layer is not None:
                after_layer(i)
        return o.reshape(-1, a.q_size)
