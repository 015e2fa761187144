"""The Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2-style qkv bias) over a flat batch.

Tokens of all sequences in a step are concatenated: input_ids [T], positions [T]. Attention goes
through the backend (engine/attention.py), which owns the paged KV cache. Math follows Hugging Face
transformers' Llama (RMSNorm in float32, rotate-half RoPE, SiLU-gated MLP) so greedy outputs match.

Two paths compute the same function. The plain torch path (CPU, and `fused=False`) is the one
tested equal to transformers. The fused path (the engine's GPU path) runs the layer glue as
three Triton kernels from splitserve.kernels, each rounding where the torch code rounds:
residual add + RMSNorm in one kernel (the residual stream is updated in place), RoPE on q and k
from a cos/sin cache built once, fused with the paged KV write when the attention backend offers
`rope_write_kv`, and SiLU-and-mul. That is ~9 kernels per layer instead of ~37, which is what a
decode step replayed from a CUDA graph pays for (each small kernel costs ~2 us on an H200).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .arch import ModelArch


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    d = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rs = arch.rope_scaling
    if not rs:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(rs["factor"])
    if kind == "llama3":
        return _llama3_scale(inv, rs)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def _llama3_scale(inv: torch.Tensor, rs: dict) -> torch.Tensor:
    factor, lo, hi = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class LlamaModel:
    def __init__(self, arch: ModelArch, weights: dict[str, torch.Tensor], fused: bool = False,
                 max_positions: int | None = None):
        """fused: run the layer glue as Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
        max_positions: rows of the fused path's cos/sin cache (positions must stay below it)."""
        self.arch = arch
        self.w = weights
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.device = weights["model.embed_tokens.weight"].device
        self.inv_freq = rope_inv_freq(arch).to(self.device)
        self.lm_head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        self.layers = [self._layer_weights(i) for i in range(arch.num_layers)]
        self.fused = fused
        if fused:
            from .. import kernels   # lazy: Triton loads only for the fused path
            from .model_fused import FusedForward
            self.cos_sin = kernels.rope_cos_sin_cache(self.inv_freq, max_positions or arch.max_position_embeddings,
                                                     self.dtype)   # [max_positions, head_dim]: cos | sin
            self._fused = FusedForward(self, kernels)

    def _layer_weights(self, i: int) -> dict[str, torch.Tensor | None]:
        p = f"model.layers.{i}."
        w = self.w   # the separate q/k/v and gate/up tensors are dropped once fused (memory)
        # q, k, v fused into one matmul: [q_size + 2 * kv_size, hidden]
        qkv = torch.cat([w.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"], dim=0)
        bias = None
        if self.arch.qkv_bias:
            bias = torch.cat([w.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"], dim=0)
        gate_up = torch.cat([w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")], dim=0)
        return {"ln1": w[p + "input_layernorm.weight"], "ln2": w[p + "post_attention_layernorm.weight"],
                "qkv": qkv, "qkv_bias": bias, "o": w[p + "self_attn.o_proj.weight"],
                "gate_up": gate_up, "down": w[p + "mlp.down_proj.weight"]}

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn,
                logits_indices: torch.Tensor | None = None, after_layer=None,
                float_logits: bool = True) -> torch.Tensor:
        """input_ids, positions: [T]; returns logits [len(logits_indices) or T, vocab], float32
        (float_logits) or the LM head's own dtype (no cast kernel: greedy decoding reads them
        once, and the cast is exact, so the argmax is the same).
        after_layer(i), if given, is called once layer i's KV is written (enqueued on the current
        CUDA stream): a prefill worker pushes that layer to the decode side while the rest run."""
        if self.fused:
            return self._fused.forward(input_ids, positions, attn, logits_indices, after_layer,
                                       float_logits)
        a = self.arch
        x = F.embedding(input_ids, self.w["model.embed_tokens.weight"])      # [T, hidden]
        cos, sin = self.rope(positions)
        for i, lw in enumerate(self.layers):
            h = rms_norm(x, lw["ln1"], a.rms_norm_eps)
            qkv = F.linear(h, lw["qkv"], lw["qkv_bias"])
            q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
            q = q.view(-1, a.num_heads, a.head_dim)                           # [T, Hq, D]
            k = k.view(-1, a.num_kv_heads, a.head_dim)                        # [T, Hkv, D]
            v = v.view(-1, a.num_kv_heads, a.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            o = attn.forward(i, q, k, v).reshape(-1, a.q_size)
            if after_layer is not None:
                after_layer(i)
            x = x + F.linear(o, lw["o"])
            h = rms_norm(x, lw["ln2"], a.rms_norm_eps)
            gate, up = F.linear(h, lw["gate_up"]).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, lw["down"])
        if logits_indices is not None:
            x = x[logits_indices]
        x = rms_norm(x, self.w["model.norm.weight"], a.rms_norm_eps)
        logits = F.linear(x, self.lm_head)
        return logits.float() if float_logits else logits
