"""Argument checks and small helpers shared by the Triton kernel wrappers.

Every wrapper validates its inputs here before launching, so that a wrong shape, dtype,
stride or device fails with a ValueError naming the argument instead of a fault or a
silently wrong result inside a kernel. Nothing here reads tensor *values*: the checks use
shapes, dtypes, strides and devices only, which keeps every wrapper CUDA-graph capturable.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from .reference import FP8_DTYPE

ACT_DTYPES = (torch.float16, torch.bfloat16)
KV_DTYPES = (torch.float16, torch.bfloat16, FP8_DTYPE)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _sm_count_cached(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessor count of `device` (cached: no sync, safe inside graph capture).

    The interpreter has no multiprocessors; it reports a small fixed number so that
    split-KV is still exercised on CPU.
    """
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_cached(index)


def check(cond: bool, msg: Callable[[], str]) -> None:
    """Raise ValueError(msg()) unless cond. The message is built only on failure: these
    checks run on every kernel call, and formatting them eagerly cost ~40 us of host time."""
    if not cond:
        raise ValueError(msg())


def check_device(ref_name: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """All tensors on ref's device; CPU tensors only under the Triton interpreter."""
    if ref.device.type == "cpu":
        check(interpreting(), lambda: f"{ref_name} is on the CPU: the Triton kernels need "
              "CUDA tensors "
              "(or TRITON_INTERPRET=1); use splitserve.kernels.reference on CPU")
    elif ref.device.type != "cuda":
        raise ValueError(f"{ref_name} is on {ref.device}; the Triton kernels need CUDA tensors")
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    check(t.dtype in allowed, lambda: f"{name} has dtype {t.dtype}; expected one of "
          f"{', '.join(str(d) for d in allowed)}")


def check_dim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    check(t.dim() == ndim, lambda: f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    check(t.stride(-1) == 1, lambda: f"{name} must be contiguous in its last dim (stride(-1)==1), "
          f"got strides {t.stride()}")


def check_head_dim(head_dim: int) -> None:
    check(16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0,
          lambda: f"head_dim {head_dim} is not supported: it must be a power of two in [16, 256]")


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor,
                   k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> bool:
    """Validate a paged K/V cache pair and its scales; returns True for an FP8 cache."""
    layout = "[num_blocks, block_size, num_kv_heads, head_dim]"
    check_dim("k_cache", k_cache, 4, layout)
    check_dim("v_cache", v_cache, 4, layout)
    check(k_cache.shape == v_cache.shape, lambda: f"k_cache {tuple(k_cache.shape)} and v_cache "
          f"{tuple(v_cache.shape)} must have the same shape {layout}")
    check_dtype("k_cache", k_cache, KV_DTYPES)
    check(v_cache.dtype == k_cache.dtype,
          lambda: f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    check_last_contiguous("k_cache", k_cache)
    v_token_minor(v_cache)
    check_head_dim(k_cache.shape[3])
    block_size = k_cache.shape[1]
    check(block_size >= 1 and block_size & (block_size - 1) == 0,
          lambda: f"block_size {block_size} must be a power of two")
    fp8 = k_cache.dtype == FP8_DTYPE
    num_kv_heads = k_cache.shape[2]
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not fp8:
            check(scale is None, lambda: f"{name} was given but the cache is {k_cache.dtype}: "
                  "scales belong to FP8 caches only")
            continue
        check(scale is not None, lambda: f"the cache is FP8 ({FP8_DTYPE}) but no {name} was given; "
              "an FP8 KV cache must travel with its per-kv-head float32 scales")
        assert scale is not None
        check(scale.dtype == torch.float32 and tuple(scale.shape) == (num_kv_heads,),
              lambda: f"{name} must be float32 [num_kv_heads={num_kv_heads}], got {scale.dtype} "
              f"{tuple(scale.shape)}")
        check(scale.stride(0) == 1, lambda: f"{name} must be contiguous")
    return fp8


def v_token_minor(v_cache: torch.Tensor) -> bool:
    """Which of the two V page layouts `v_cache` [num_blocks, block_size, num_kv_heads, head_dim]
    has (see `reference.token_minor_v`): False for head_dim-contiguous pages (any block / token /
    head strides), True for token-minor pages, whose bytes are [num_kv_heads, head_dim,
    block_size] (strides (*, 1, head_dim * block_size, block_size)). Anything else is refused."""
    _, bs, _, d = v_cache.shape
    if v_cache.stride(-1) == 1:
        return False
    check(v_cache.stride()[1:] == (1, d * bs, bs),
          lambda: f"v_cache must be contiguous in head_dim or token-minor within a page (strides "
          f"(*, 1, {d * bs}, {bs}), see reference.token_minor_v); got strides {v_cache.stride()}")
    return True


def check_seq_metadata(seq_lens: torch.Tensor, block_tables: torch.Tensor,
                       num_seqs: int) -> None:
    check_dim("seq_lens", seq_lens, 1, "[num_seqs]")
    check(seq_lens.dtype == torch.int32, lambda: f"seq_lens must be int32, got {seq_lens.dtype}")
    check(seq_lens.shape[0] == num_seqs,
          lambda: f"seq_lens has {seq_lens.shape[0]} entries, expected num_seqs={num_seqs}")
    check_dim("block_tables", block_tables, 2, "[num_seqs, max_blocks_per_seq]")
    check(block_tables.dtype == torch.int32,
          lambda: f"block_tables must be int32, got {block_tables.dtype}")
    check(block_tables.shape[0] >= num_seqs,
          lambda: f"block_tables has {block_tables.shape[0]} rows, expected at least "
          f"num_seqs={num_seqs}")
    check_last_contiguous("block_tables", block_tables)
    check(seq_lens.stride(0) == 1, lambda: "seq_lens must be contiguous")


def check_attention_args(q: torch.Tensor, q_layout: str, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                         v_scale: torch.Tensor | None) -> bool:
    """q [rows, num_q_heads, head_dim] against the paged caches (shared by every attention
    wrapper): dtypes, head_dim, GQA divisibility. Returns whether FP8."""
    fp8 = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    check_dim("q", q, 3, q_layout)
    check_dtype("q", q, ACT_DTYPES)
    check_last_contiguous("q", q)
    _, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    check(head_dim == k_cache.shape[3],
          lambda: f"q head_dim {head_dim} != cache head_dim {k_cache.shape[3]}")
    check(num_q_heads % num_kv_heads == 0,
          lambda: f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    check(fp8 or k_cache.dtype == q.dtype,
          lambda: f"q is {q.dtype} but the cache is {k_cache.dtype}; a non-FP8 cache must match q")
    return fp8


def check_query_start_loc(query_start_loc: torch.Tensor) -> int:
    """int32 contiguous [num_seqs + 1] cumulative query offsets; returns num_seqs."""
    check_dim("query_start_loc", query_start_loc, 1, "[num_seqs + 1]")
    check(query_start_loc.dtype == torch.int32,
          lambda: f"query_start_loc must be int32, got {query_start_loc.dtype}")
    check(query_start_loc.shape[0] >= 1 and query_start_loc.stride(0) == 1,
          lambda: "query_start_loc must be contiguous with num_seqs + 1 >= 1 entries")
    return query_start_loc.shape[0] - 1


def check_out_like(out: torch.Tensor, q: torch.Tensor) -> None:
    """A preallocated output with q's shape and dtype, last dim contiguous."""
    check(out.shape == q.shape and out.dtype == q.dtype,
          lambda: f"out must be {q.dtype} {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}")
    check_last_contiguous("out", out)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
