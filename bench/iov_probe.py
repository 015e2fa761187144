#!/usr/bin/env python3
"""Does a UCP IOV tag message (kvtransfer/iov.py) carry scattered regions as fast as one
contiguous ucxx send of the same bytes? One process, a ucxx endpoint to its own listener.

    python bench/iov_probe.py --device cpu|cuda [--regions 1024] [--region-kib 32] [--reps 3]

Regions: `--regions` random rows of a pool of 4x as many `--region-kib` KiB rows, sent as one
descriptor list into random rows of a second pool; the bytes are checked. Baseline: one
contiguous buffer of the same size through ucxx's own tag send/receive, same endpoint. On CUDA
this asks whether UCX takes descriptor lists of device memory at all (kvtransfer uses them for
host pools only).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import():
    try:
        from splitserve.kvtransfer import iov
    except ImportError:   # the device has no install: splitserve/ -> this checkout
        import types
        pkg = types.ModuleType("splitserve")
        pkg.__path__ = [str(ROOT / "splitserve"), str(ROOT)]
        sys.modules["splitserve"] = pkg
        from splitserve.kvtransfer import iov
    return iov


async def main(args) -> None:
    import numpy as np
    import ucxx
    from ucxx._lib.arr import Array
    from ucxx.types import Tag, TagMaskFull
    iov = _import()
    from splitserve.kvtransfer.pool import as_buffer
    ucxx.init(progress_mode="thread", enable_python_future=True, enable_delayed_submission=False)
    worker = ucxx.core._get_ctx().worker
    keep = []
    listener = ucxx.create_listener(keep.append)
    ep = await ucxx.create_endpoint("127.0.0.1", listener.port)
    dev = torch.device(args.device)
    n, rb = args.regions, args.region_kib << 10
    src = torch.randint(0, 255, (4 * n, rb), dtype=torch.uint8, device=dev)
    dst = torch.zeros_like(src)
    g = torch.Generator().manual_seed(0)
    for rep in range(args.reps):
        rs = torch.randperm(4 * n, generator=g)[:n].tolist()
        rd = torch.randperm(4 * n, generator=g)[:n].tolist()
        dst.zero_()
        sd = iov.Descriptors(np.array([(src.data_ptr() + i * rb, rb) for i in rs], dtype=np.uint64))
        dd = iov.Descriptors(np.array([(dst.data_ptr() + i * rb, rb) for i in rd], dtype=np.uint64))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        landed = iov.recv(worker.handle, dd, 0x51 + rep, keep=dst)
        sent = iov.send(ep._ep.handle, sd, 0x51 + rep, keep=src)
        try:
            await asyncio.wait_for(sent, 30)
            got = await asyncio.wait_for(landed, 30)
        except Exception as e:
            print(f"iov rep {rep}: FAILED {e!r}", flush=True)
            return
        dt = time.perf_counter() - t0
        ok = torch.equal(src[rs], dst[rd])
        print(f"iov  rep {rep}: {n} x {args.region_kib} KiB, {got} bytes in {dt * 1e3:.2f} ms "
              f"({n * rb / dt / 1e9:.2f} GB/s), bytes {'ok' if ok else 'WRONG'}", flush=True)
    a = torch.randint(0, 255, (n * rb,), dtype=torch.uint8, device=dev)
    b = torch.zeros_like(a)
    for rep in range(args.reps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        req = worker.tag_recv(Array(as_buffer(b)), Tag(0x71 + rep), TagMaskFull)
        await ep.send(as_buffer(a), tag=0x71 + rep, force_tag=True)
        await req.wait()
        dt = time.perf_counter() - t0
        print(f"raw  rep {rep}: one {n * rb >> 20} MiB buffer in {dt * 1e3:.2f} ms "
              f"({n * rb / dt / 1e9:.2f} GB/s), bytes {'ok' if torch.equal(a, b) else 'WRONG'}",
              flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--regions", type=int, default=1024)
    ap.add_argument("--region-kib", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    asyncio.run(main(ap.parse_args()))
