"""Random paged-attention problems for the kernel tests and bench/kernels.py.

Caches are filled with random values, never zeros. Everything a correct kernel must not read
is NaN: the cache slots past each sequence's length in its last block, and the spare blocks
that unused block-table entries point at. A kernel that reads them without masking returns
NaN, which every comparison rejects.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import FP8_DTYPE, token_minor_v


@dataclass
class PagedCase:
    q: torch.Tensor                 # [num_tokens, num_q_heads, head_dim]
    k_cache: torch.Tensor           # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor   # int32 [num_seqs + 1]
    seq_lens: torch.Tensor          # int32 [num_seqs]
    block_tables: torch.Tensor      # int32 [num_seqs, max_blocks_per_seq]
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None
    scale: float
    max_query_len: int


def make_paged_case(seq_lens: list[int], q_lens: list[int], num_q_heads: int,
                    num_kv_heads: int, head_dim: int, block_size: int,
                    dtype: torch.dtype, kv_dtype: torch.dtype, device: str | torch.device = "cpu",
                    seed: int = 0, spare_blocks: int = 2,
                    v_token_minor: bool | None = None) -> PagedCase:
    """A varlen batch: seq i has seq_lens[i] context tokens of which the last q_lens[i] are new.

    Physical blocks are shuffled so that logically adjacent blocks are not adjacent in memory.
    FP8 caches hold random e4m3 values with random per-head scales in [0.05, 0.5].
    v_token_minor: V pages token-minor (`reference.token_minor_v`); default as the engine's
    KVCache: for FP8 caches.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nblks = [(s + block_size - 1) // block_size for s in seq_lens]
    max_blocks = max(nblks + [1])
    used = sum(nblks)
    num_blocks = used + spare_blocks
    perm = torch.randperm(used, generator=gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if kv_dtype == FP8_DTYPE:
        def rand_cache() -> torch.Tensor:
            return (torch.randn(shape, generator=gen) * 64).clamp(-448, 448).to(FP8_DTYPE)
        k_scale = torch.rand(num_kv_heads, generator=gen) * 0.45 + 0.05
        v_scale = torch.rand(num_kv_heads, generator=gen) * 0.45 + 0.05
    else:
        def rand_cache() -> torch.Tensor:
            return torch.randn(shape, generator=gen).to(kv_dtype)
        k_scale = v_scale = None
    k_cache, v_cache = rand_cache(), rand_cache()
    tables = torch.full((len(seq_lens), max_blocks), used, dtype=torch.int32)  # -> NaN block
    at = 0
    for i, (s, n) in enumerate(zip(seq_lens, nblks)):
        blocks = perm[at:at + n]
        at += n
        tables[i, :n] = blocks.to(torch.int32)
        tail = s - (n - 1) * block_size if n else 0
        if n and tail < block_size:           # slots past seq_len in the last block
            k_cache[blocks[-1], tail:] = float("nan")
            v_cache[blocks[-1], tail:] = float("nan")
    k_cache[used:] = float("nan")
    v_cache[used:] = float("nan")
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], num_q_heads, head_dim, generator=gen).to(dtype)
    dev = torch.device(device)
    v_dev = v_cache.to(dev)
    if kv_dtype == FP8_DTYPE if v_token_minor is None else v_token_minor:
        v_dev = as_token_minor(v_dev)
    return PagedCase(
        q=q.to(dev), k_cache=k_cache.to(dev), v_cache=v_dev,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=tables.to(dev),
        k_scale=None if k_scale is None else k_scale.to(dev),
        v_scale=None if v_scale is None else v_scale.to(dev),
        scale=head_dim ** -0.5, max_query_len=max(q_lens + [0]))


def as_token_minor(t: torch.Tensor) -> torch.Tensor:
    """The same logical V cache [num_blocks, block_size, H, D] with token-minor pages."""
    out = token_minor_v(torch.empty(t.shape, dtype=t.dtype, device=t.device))
    out.copy_(t)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN)."""
    diff = (out.double() - ref.double()).norm()
    return float(diff / ref.double().norm().clamp_min(1e-30))


def patch_interpreter_bf16_dot() -> bool:
    """Make the Triton CPU interpreter's tl.dot decode bf16 operands (test-only shim).

    Triton 3.9's interpreter keeps bf16 tensors as uint16 bit patterns and hands them to
    numpy.matmul as integers, so every bf16 x bf16 dot returns garbage (seen 2026-11-29;
    fp16 and fp32 dots are right). This widens bf16 operands to float32 first, which is what
    the tensor cores do (exact products, fp32 accumulation). Returns whether it patched.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or getattr(builder, "_bf16_dot_patched", False):
        return False
    original = builder.create_dot

    def widen(x):  # type: ignore[no-untyped-def]
        if x.dtype.scalar == tl.bfloat16 and x.data.dtype == np.uint16:
            return handle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot
    builder._bf16_dot_patched = True
    return True


KERNEL_MODULES = ("_rounding", "kv_write", "splitkv_reduce", "decode_attention", "extend_attention",
                  "rmsnorm", "rope", "silu_mul", "skinny_gemm")


def setup_kernel_tests() -> str:
    """Pick where kernel tests run and make sure the kernels were built for it.

    With no CUDA device the kernels run in Triton's CPU interpreter, which TRITON_INTERPRET=1
    selects when `triton.jit` decorates them. The caller sets the variable before importing any
    kernel module; if another test module imported them first without it, they are reloaded
    here. Returns the device name the tests should use.
    """
    import importlib
    import os

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"
    patch_interpreter_bf16_dot()
    for name in KERNEL_MODULES:   # order matters: decode imports splitkv_reduce
        mod = importlib.import_module(f"splitserve.kernels.{name}")
        kernels = [v for v in vars(mod).values() if type(v).__name__ == "JITFunction"]
        if kernels:
            importlib.reload(mod)
    return "cpu"


def graph_time_us(fns, replays: int = 20) -> float:
    """Median microseconds per fn of a CUDA graph that calls each of fns once (the benches'
    timer: warmed up outside capture -- compiles, cuBLAS handles -- then timed by events)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    times.sort()
    return times[len(times) // 2]
