"""write_kv (Triton) against write_kv_ref: bit-exact, padding slots skipped, FP8 rounding."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402

from splitserve.kernels.testing import as_token_minor, setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

from splitserve.kernels import FP8_DTYPE, write_kv, write_kv_ref  # noqa: E402


def assert_same(got: torch.Tensor, want: torch.Tensor, inputs: torch.Tensor | None = None):
    """Equal values (a zero's sign may differ: the GPU compiler is free to produce +0 for a
    rounded-away tiny negative, and -0 and +0 dequantize alike), with a useful message."""
    g, w = got.float().flatten(), want.float().flatten()
    bad = (g != w).nonzero().flatten()[:8]
    detail = f"at {bad.tolist()}: got {g[bad].tolist()}, want {w[bad].tolist()}"
    if inputs is not None:
        detail += f", inputs {inputs[bad].float().tolist()}"
    assert bad.numel() == 0, detail


def _case(num_tokens: int, num_kv_heads: int, head_dim: int, block_size: int,
          dtype: torch.dtype, kv_dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = (num_tokens + block_size - 1) // block_size + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    # the cache starts full of random values: whatever the kernel must not touch stays put
    k_cache = (torch.randn(shape, generator=gen) * 4).to(kv_dtype)
    v_cache = (torch.randn(shape, generator=gen) * 4).to(kv_dtype)
    k = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 3).to(dtype)
    v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 3).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::3] = -1                                     # padding tokens
    scales = (None, None)
    if kv_dtype == FP8_DTYPE:
        scales = (torch.rand(num_kv_heads, generator=gen) * 0.05 + 0.005,
                  torch.rand(num_kv_heads, generator=gen) * 0.05 + 0.005)
    return k, v, k_cache, v_cache, slots.long(), scales


@pytest.mark.parametrize("kv", ["bf16", "fp16", "fp8-bf16", "fp8-fp16"])
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 64, 16), (8, 128, 32),
                                                               (3, 64, 32)])
@pytest.mark.parametrize("v_token_minor", [False, True])
def test_write_kv_matches_reference(kv, num_kv_heads, head_dim, block_size, v_token_minor):
    dtype = torch.float16 if kv.endswith("fp16") else torch.bfloat16
    kv_dtype = FP8_DTYPE if kv.startswith("fp8") else dtype
    k, v, k_cache, v_cache, slots, (ks, vs) = _case(37, num_kv_heads, head_dim, block_size,
                                                   dtype, kv_dtype, seed=hash(kv) % 1000)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, ref_k, ref_v, slots, ks, vs)
    dev = [t.to(DEVICE) if t is not None else None for t in (k, v, k_cache, v_cache, slots, ks, vs)]
    if v_token_minor:
        dev[3] = as_token_minor(dev[3])
    write_kv(*dev)
    # exact: one rounding of value (/ scale) to the cache dtype, round-to-nearest-even
    assert_same(dev[2].cpu(), ref_k)
    assert_same(dev[3].cpu(), ref_v)


def test_write_kv_fp8_ties_and_saturation():
    """Halfway values between e4m3 neighbours round to even; out-of-range values saturate."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).float()   # finite >= 0
    mids = (grid[:-1] + grid[1:]) / 2                                         # exact ties
    vals = torch.cat([mids, -mids, torch.tensor([500.0, -1e4, 447.9, 1e-5])])
    n = vals.numel() // 64 * 64
    # midpoints need 4 mantissa bits: exact in bf16 (7), so the kernel sees true ties
    k = vals[:n].view(-1, 1, 64).to(torch.bfloat16)
    k_cache = torch.zeros(k.shape[0], 1, 1, 64).to(FP8_DTYPE)
    v_cache = k_cache.clone()
    slots = torch.arange(k.shape[0])
    one = torch.ones(1)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, k, ref_k, ref_v, slots, one, one)
    dk, dv = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(k.to(DEVICE), k.to(DEVICE), dk, dv, slots.to(DEVICE), one.to(DEVICE),
             one.to(DEVICE))
    assert_same(dk.cpu(), ref_k, k.flatten())


def test_write_kv_strided_input_views():
    """k and v may be head-strided views of a fused QKV projection output."""
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(9, 4 + 2 + 2, 64, generator=gen).to(torch.bfloat16)
    k, v = qkv[:, 4:6], qkv[:, 6:8]
    k_cache = torch.randn(2, 16, 2, 64, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(2, 16, 2, 64, generator=gen).to(torch.bfloat16)
    slots = torch.tensor([3, -1, 17, 0, 31, 5, -1, 20, 9])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, ref_k, ref_v, slots)
    dk, dv = k_cache.to(DEVICE), v_cache.to(DEVICE)
    write_kv(k.to(DEVICE), v.to(DEVICE), dk, dv, slots.to(DEVICE))
    assert torch.equal(dk.cpu(), ref_k) and torch.equal(dv.cpu(), ref_v)
