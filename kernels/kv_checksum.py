"""KV transfer checksums fused with the staging copy: one launch per bundle of layers.

Reference: `splitserve.kvtransfer.pool.layer_checksum` (and `Checksummer`, which gives the same
value): per layer, over the regions (layer, k|v, ids[i]) of a KV pool [L, 2, blocks, *region]
in plan order, the sum of each region's 64-bit words times an odd position weight
(2 * (kv * n + i) + 1) * MIX, all mod 2^64. Integer addition wraps, so any summation order
gives the same value: each program sums one region and adds its weighted sum atomically.

Why a kernel: on the H200 hosts a torch op costs ~30 us of host time, and the transfer agent's
gather + checksum of a bundle was ~15 ops (0.7 ms from queueing to the read-back), its
scatter + checksum on the decode side ~0.9 ms (bench/results/transfer-cuda-v23-ab.md, trace).
Here both are one launch, and the copy and the sum read the bytes once.

Modes, per position i with `slots[i]` (the region's index in the staging buffer, or -1):
  gather  -- read the pool region; write it to `buf[layer, kv, slots[i]]` when slots[i] >= 0
  scatter -- slots[i] >= 0: read `buf[layer, kv, slots[i]]` and write it to the pool region;
             else read the pool region
  sum     -- read the pool region only (slots unused)
Every region read is summed. `buf` is [k, 2, staged, *region] (a multi-layer staging bundle).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check, check_device

MIX = 0x9E3779B97F4A7C15 - (1 << 64)   # odd 64-bit constant as a signed int64 (pool._MIX)
MODES = {"sum": 0, "gather": 1, "scatter": 2}
BLOCK_WORDS = 1024                      # 8 KiB of a region per step


@triton.jit
def _region_sums(pool_ptr, buf_ptr, ids_ptr, slots_ptr, sums_ptr, l0, n, num_blocks, staged,
                 mix, WORDS: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr):
    pool_ptr = pool_ptr.to(tl.pointer_type(tl.int64), bitcast=True)   # the bytes as words
    buf_ptr = buf_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    pid = tl.program_id(0).to(tl.int64)          # over (layer - l0, kv, i)
    layer = pid // (2 * n)
    kv = (pid // n) % 2
    i = pid % n
    block = tl.load(ids_ptr + i).to(tl.int64)
    src = pool_ptr + (((l0 + layer) * 2 + kv) * num_blocks + block) * WORDS
    acc = tl.zeros([BLOCK], dtype=tl.int64)
    if MODE == 0:
        for w0 in range(0, WORDS, BLOCK):
            offs = w0 + tl.arange(0, BLOCK)
            acc += tl.load(src + offs, mask=offs < WORDS, other=0)
    else:
        slot = tl.load(slots_ptr + i).to(tl.int64)
        row = buf_ptr + ((layer * 2 + kv) * staged + tl.maximum(slot, 0)) * WORDS
        slot_v = tl.full([BLOCK], 0, tl.int64) + slot     # the masks as vectors
        for w0 in range(0, WORDS, BLOCK):
            offs = w0 + tl.arange(0, BLOCK)
            m = offs < WORDS
            in_buf = m & (slot_v >= 0)
            if MODE == 1:
                x = tl.load(src + offs, mask=m, other=0)
                tl.store(row + offs, x, mask=in_buf)
            else:
                xb = tl.load(row + offs, mask=in_buf, other=0)
                xp = tl.load(src + offs, mask=m & (slot_v < 0), other=0)
                x = tl.where(in_buf, xb, xp)
                tl.store(src + offs, x, mask=in_buf)
            acc += x
    weight = (2 * (kv * n + i) + 1) * mix
    tl.atomic_add(sums_ptr + layer, tl.sum(acc, axis=0) * weight)


def region_sums(pool: torch.Tensor, l0: int, k: int, ids: torch.Tensor, sums: torch.Tensor,
                mode: str = "sum", slots: torch.Tensor | None = None,
                buf: torch.Tensor | None = None) -> torch.Tensor:
    """Add layers l0 .. l0 + k - 1's checksums (without the FP8 scales' term) into `sums[:k]`
    (int64, zeroed by the caller), copying staged regions as `mode` says (module docstring).
    pool: [L, 2, blocks, *region] (any dtype, contiguous); ids: [n] int64 block ids in plan
    order; slots: [n] int64 (gather/scatter); buf: [k, 2, staged, *region], pool's dtype."""
    check(mode in MODES, lambda: f"mode {mode!r}: use one of {sorted(MODES)}")
    check_device("pool", pool, ids=ids, sums=sums, slots=slots, buf=buf)
    check(pool.is_contiguous() and pool.dim() >= 4, lambda: "pool must be a contiguous [L, 2, blocks, *region]")
    region = math.prod(pool.shape[3:]) * pool.element_size()
    check(region % 8 == 0, lambda: f"a region is {region} bytes: not a whole number of 64-bit words")
    check(0 <= l0 and l0 + k <= pool.shape[0] and k >= 1, lambda: f"layers {l0}..{l0 + k - 1} outside the pool")
    n = ids.numel()
    check(n >= 1 and ids.dtype == torch.int64 and ids.is_contiguous(), lambda: "ids: a non-empty contiguous int64 tensor")
    check(sums.dtype == torch.int64 and sums.numel() >= k and sums.is_contiguous(), lambda: "sums: contiguous int64 of >= k")
    staged = 0
    if mode != "sum":
        check(slots is not None and buf is not None, lambda: f"mode {mode} needs slots and buf")
        check(slots.dtype == torch.int64 and slots.numel() == n and slots.is_contiguous(),
              lambda: "slots: contiguous int64, one per id")
        check(buf.dtype == pool.dtype and buf.is_contiguous() and buf.shape[0] >= k
              and buf.shape[1] == 2 and tuple(buf.shape[3:]) == tuple(pool.shape[3:]),
              lambda: f"buf {tuple(buf.shape)} {buf.dtype}: need [k, 2, staged, *region] of the pool's dtype")
        staged = buf.shape[2]
    # the kernel reads the pool's and the buffer's bytes as int64 words by a pointer bitcast
    # (no torch views to make per launch on the transfer agent's critical path)
    block = min(BLOCK_WORDS, triton.next_power_of_2(region // 8))
    _region_sums[(k * 2 * n,)](pool, buf if buf is not None else pool, ids,
                               slots if slots is not None else ids, sums, l0, n, pool.shape[2],
                               staged, MIX, WORDS=region // 8, BLOCK=block, MODE=MODES[mode])
    return sums
