"""Does UCX carry one big buffer as fast in many messages as in one? (issue 5, diagnostic)

    python3 bench/raw_parts.py --device cuda --mib 512,8192 --parts 1,8,64 --reps 5

Two transfer-agent workers (as bench/transfer.py); for each size, the raw send of the pool's
first bytes as 1 message, then as k equal messages posted at once (receives posted first), each
until the receiver's ack. A paged handoff of a contiguous run in the layer-major pool is 64
messages (layer x K|V): if k messages cost much more than one, the per-message cost is the gap.
Interleaved per rep; prints medians (ms) and GB/s.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer as _bench  # noqa: E402  (the package mapping on the device; LLAMA3_8B)

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mib", default="32,512")
    ap.add_argument("--parts", default="1,8,64")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    from splitserve.kvtransfer.testing import spawn_worker
    sizes = [int(x) << 20 for x in args.mib.split(",")]
    parts = [int(x) for x in args.parts.split(",")]
    nb = -(-max(sizes) // (2 << 20))
    layout = dict(_bench.LLAMA3_8B, num_blocks=nb)
    cfg = {"self_test": False, "lease_timeout_s": 600.0}
    d = spawn_worker(layout, seed=1, config_kw=cfg, device=args.device, start_timeout=600)
    p = spawn_worker(layout, seed=2, config_kw=cfg, device=args.device, start_timeout=600)
    d.call("raw_connect", p.address)
    tag = 0x5D00_0000_0000_0000
    for nbytes in sizes:
        times = {k: [] for k in parts}
        for r in range(args.reps + 1):          # first: warm-up (IPC handles, registration)
            for k in parts:
                tag += 256
                d.call("raw_recv", nbytes, tag, k)
                t = p.call("raw_send", d.address, nbytes, tag, k, timeout=600)
                if r:
                    times[k].append(t)
        for k in parts:
            ms = statistics.median(times[k]) * 1e3
            print(f"{nbytes >> 20:6d} MiB in {k:3d} messages: {ms:8.3f} ms  {nbytes / ms / 1e6:8.1f} GB/s"
                  f"  (min {min(times[k]) * 1e3:.3f}, max {max(times[k]) * 1e3:.3f})", flush=True)
    d.close()
    p.close()


if __name__ == "__main__":
    main()
