"""A decode step's inputs in and greedy tokens out as two small kernels instead of copies.

Around each decode-step graph the engine used to issue a host-to-device copy of the step's
inputs, an index_select + index_copy for the input ids taken from the previous step's tokens on
the device, a device copy of the tokens and a device-to-host copy of them: six operations, the
copies on the copy engines, each with 3-9 us of gap before the next on the H200 (bench/step_trace.py,
engine-b1-2026-11-29-s10.md). Here:

* `stage_inputs` reads the pinned staging buffer straight over PCIe (mapped host memory) into the
  device buffers and, in its first program, puts the previous step's tokens into the gathered
  rows (after a CTA barrier, so they win over the staged placeholders);
* `tokens_out` writes the step's tokens to a fresh device tensor (the next step's gather source)
  and into pinned host memory (what the engine reads after an event).

Both are plain kernels on the compute stream, outside the graph. References: `stage_inputs_ref`,
`tokens_out_ref`. On CPU (Triton interpreter) the "host" buffers are ordinary tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check

BLOCK = 4096        # int32 words per program of stage_inputs
GATHER_BLOCK = 256  # most rows one step gathers (the largest decode bucket)


@triton.jit
def _stage_kernel(host_ptr, dev_ptr, n_words, tok_ptr, m, top,
                  BLOCK: tl.constexpr, GATHER_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(dev_ptr + offs, tl.load(host_ptr + offs, mask=offs < n_words), mask=offs < n_words)
    if pid == 0:                       # this program also copied the ids row (2 * top words)
        tl.debug_barrier()
        j = tl.arange(0, GATHER_BLOCK)
        h64 = host_ptr.to(tl.pointer_type(tl.int64))
        d64 = dev_ptr.to(tl.pointer_type(tl.int64))
        dst = tl.load(h64 + 3 * top + j, mask=j < m, other=0)
        src = tl.load(h64 + 4 * top + j, mask=j < m, other=0)
        tl.store(d64 + dst, tl.load(tok_ptr + src, mask=j < m, other=0), mask=j < m)


@triton.jit
def _tokens_out_kernel(tok_ptr, dev_out_ptr, host_out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    t = tl.load(tok_ptr + offs, mask=offs < n)
    tl.store(dev_out_ptr + offs, t, mask=offs < n)
    tl.store(host_out_ptr + offs, t, mask=offs < n)


def stage_inputs(host: torch.Tensor, dev: torch.Tensor, nbytes: int, top: int,
                 prev_tokens: torch.Tensor | None, m: int) -> None:
    """Copy host[:nbytes] -> dev[:nbytes] (uint8 buffers whose first 5 * top * 8 bytes are the
    int64 rows ids, positions, slots, gather dst, gather src), then ids[dst[j]] =
    prev_tokens[src[j]] for j < m. host: pinned (mapped) memory on CUDA."""
    check(host.dtype == dev.dtype == torch.uint8 and host.is_contiguous() and dev.is_contiguous(),
          lambda: "host and dev must be contiguous uint8 buffers")
    check(nbytes % 4 == 0 and 40 * top <= nbytes <= min(host.numel(), dev.numel()),
          lambda: f"nbytes {nbytes} must be a multiple of 4 covering the int64 rows (>= {40 * top})")
    check(2 * top <= BLOCK and top <= GATHER_BLOCK and 0 <= m <= top,
          lambda: f"top {top} and m {m} exceed the kernel's blocks")
    check(m == 0 or (prev_tokens is not None and prev_tokens.dtype == torch.int64),
          lambda: "a gather needs the previous step's int64 tokens")
    n_words = nbytes // 4
    tok = prev_tokens if m else dev
    _stage_kernel[(triton.cdiv(n_words, BLOCK),)](host.view(torch.int32), dev.view(torch.int32), n_words,
                                                  tok, m, top, BLOCK=BLOCK, GATHER_BLOCK=GATHER_BLOCK,
                                                  num_warps=4)


def stage_inputs_ref(host, dev, nbytes, top, prev_tokens, m) -> None:
    dev[:nbytes].copy_(host[:nbytes])
    if m:
        i64 = host[:40 * top].view(torch.int64).view(5, top)
        ids = dev[:8 * top].view(torch.int64)
        ids[i64[3, :m].to(ids.device)] = prev_tokens[i64[4, :m].to(prev_tokens.device)]


def tokens_out(tokens: torch.Tensor, host_out: torch.Tensor) -> torch.Tensor:
    """A device copy of int64 tokens [n] (returned) and the same into host_out[:n] (pinned)."""
    n = tokens.numel()
    check(tokens.dtype == host_out.dtype == torch.int64 and tokens.is_contiguous() and host_out.numel() >= n,
          lambda: "tokens_out needs contiguous int64 tokens and a host buffer at least as long")
    out = torch.empty_like(tokens)
    if n:
        _tokens_out_kernel[(1,)](tokens, out, host_out, n, BLOCK=max(16, triton.next_power_of_2(n)),
                                 num_warps=1)
    return out


def tokens_out_ref(tokens: torch.Tensor, host_out: torch.Tensor) -> torch.Tensor:
    host_out[:tokens.numel()].copy_(tokens)
    return tokens.clone()
