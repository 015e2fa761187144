"""Host cost of the torch work inside one kvtransfer executor hop (diagnostic, one process):
gather of a layer's staged regions, the sender's/receiver's per-layer checksum, the scatter,
each with its completion wait, and an empty executor round trip for scale.

    python bench/transfer_hops.py --device cuda --blocks 1,16,256
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer as tb   # noqa: E402  (package mapping on the device)
from timing import timed as median_s  # noqa: E402


def timed(fn, reps: int) -> float:
    """Median microseconds of fn() (one warm-up call)."""
    return median_s(fn, reps, warmup=1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", default="1,16,256")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import torch
    from splitserve.kvtransfer import pool
    from splitserve.kvtransfer.layout import KVLayout
    sizes = [int(s) for s in args.blocks.split(",")]
    nb = 2 * max(sizes) + 8
    lay = KVLayout(**dict(tb.LLAMA3_8B, num_blocks=nb))
    kv = torch.randint(-100, 100, lay.shape, device=args.device).to(torch.bfloat16)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    side = torch.cuda.Stream(dev, priority=-1) if cuda else None

    def sync():
        if cuda:
            ev = torch.cuda.Event()
            ev.record(side)
            ev.synchronize()

    ex = concurrent.futures.ThreadPoolExecutor(2)
    loop = asyncio.new_event_loop()
    rows = []
    for n in sizes:
        ids = random.Random(n).sample(range(nb), n)
        idx = pool.index_tensor(ids, dev)
        st = pool.staging_tensor(kv, n, 1)
        sums = pool.Checksummer(kv, ids, None, list(range(n)))        # fully staged: short path
        general = pool.Checksummer(kv, ids, None, list(range(n)))
        general.all_staged = False                                     # the general path, same data
        dsums = pool.Checksummer(kv, ids)

        def gather():
            with torch.cuda.stream(side):
                pool.gather_staged(kv, 3, idx, st)
                sync()

        def scatter():
            with torch.cuda.stream(side):
                pool.scatter_staged(kv, 3, idx, st)
                sync()

        def psum():
            with torch.cuda.stream(side):
                sums.layers([3], [st[0]])

        def psum_general():
            with torch.cuda.stream(side):
                general.layers([3], [st[0]])

        def dsum():
            with torch.cuda.stream(side):
                dsums.layers([3])

        def hop(fn):
            async def go():
                await loop.run_in_executor(ex, fn)
            return lambda: loop.run_until_complete(go())

        row = {"blocks": n, "MiB_per_layer": 2 * n * lay.region_bytes / 2**20,
               "empty_event_sync_us": timed(sync, args.reps),
               "gather_us": timed(gather, args.reps), "scatter_us": timed(scatter, args.reps),
               "sender_sum_us": timed(psum, args.reps),
               "sender_sum_general_path_us": timed(psum_general, args.reps), "receiver_sum_us": timed(dsum, args.reps),
               "empty_hop_us": timed(hop(lambda: None), args.reps),
               "gather_hop_us": timed(hop(gather), args.reps)}
        rows.append(row)
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "transfer-hops.json").write_text(json.dumps({"commit": tb.commit(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
