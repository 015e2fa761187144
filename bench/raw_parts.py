"""Does UCX carry one big buffer as fast in many messages as in one? And what does the least
verification cost? (issue 5, diagnostic)

    python3 bench/raw_parts.py --device cuda --mib 512,8192 --parts 1,8,64 --reps 5
    python3 bench/raw_parts.py --device cuda --mib 32,512,8192 --parts 1,1:sent,1:summed

Two transfer-agent workers (as bench/transfer.py); for each size, the raw send of the pool's
first bytes as 1 message, then as k equal messages posted at once (receives posted first), each
until the receiver's ack. A paged handoff of a contiguous run in the layer-major pool is 64
messages (layer x K|V): if k messages cost much more than one, the per-message cost is the gap.
`k:sent` / `k:summed`: the same send followed by an 8-byte checksum message; the receiver sums
every landed byte (one torch reduction, one value back) and acks only then. `sent`: the sender's
sum is taken before the clock starts (as if computed when the KV was written); `summed`: inside
it. That is the floor of a verified handoff with these parts, nothing of the agent's protocol
(per-layer sums, leases, begin/complete) included. Interleaved per rep; prints medians (ms),
GB/s and each variant's ratio to the plain one-message send.
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
    ap.add_argument("--rtt", type=int, default=0, help="first, this many control round trips each way")
    args = ap.parse_args()
    from splitserve.kvtransfer.testing import spawn_worker
    from splitserve.kvtransfer.testing_raw import VERIFY_MODES
    sizes = [int(x) << 20 for x in args.mib.split(",")]
    variants = []
    for x in args.parts.split(","):
        k, _, verify = x.partition(":")
        if verify not in VERIFY_MODES:
            raise SystemExit(f"--parts {x}: the verify mode must be sent or summed")
        variants.append((x, int(k), verify))
    nb = -(-max(sizes) // (2 << 20))
    layout = dict(_bench.LLAMA3_8B, num_blocks=nb)
    cfg = {"self_test": False, "lease_timeout_s": 600.0}
    d = spawn_worker(layout, seed=1, config_kw=cfg, device=args.device, start_timeout=600)
    p = spawn_worker(layout, seed=2, config_kw=cfg, device=args.device, start_timeout=600)
    d.call("raw_connect", p.address)
    tag = 0x5D00_0000_0000_0000
    if args.rtt:   # control-message floors: active messages (the agent's) vs pre-posted tags
        am = sorted(p.call("rtt", d.address, args.rtt))
        d.call("tag_echo", tag, args.rtt)
        tg = sorted(p.call("tag_rtt", d.address, tag, args.rtt))
        tag += 2 * args.rtt + 256
        for name, t in (("active message", am), ("tag message", tg)):
            print(f"round trip, {name}: median {t[len(t) // 2] * 1e6:.0f} us "
                  f"(min {t[0] * 1e6:.0f}, max {t[-1] * 1e6:.0f})", flush=True)
    for nbytes in sizes:
        times = {name: [] for name, _, _ in variants}
        for r in range(args.reps + 1):          # first: warm-up (IPC handles, registration)
            for name, k, verify in variants:
                tag += 256
                d.call("raw_recv", nbytes, tag, k, bool(verify))
                t = p.call("raw_send", d.address, nbytes, tag, k, verify, timeout=600)
                if r:
                    times[name].append(t)
        if any(v for _, _, v in variants):
            ms = d.call("raw_sum_seconds", nbytes) * 1e3
            print(f"{nbytes >> 20:6d} MiB, the receiver's sum alone: {ms:8.3f} ms"
                  f"  {nbytes / ms / 1e6:8.1f} GB/s read", flush=True)
        base = statistics.median(times[variants[0][0]])
        for name, _, _ in variants:
            ms = statistics.median(times[name]) * 1e3
            print(f"{nbytes >> 20:6d} MiB, {name:>9}: {ms:8.3f} ms  {nbytes / ms / 1e6:8.1f} GB/s"
                  f"  {base * 1e3 / ms:5.2f}x of {variants[0][0]}"
                  f"  (min {min(times[name]) * 1e3:.3f}, max {max(times[name]) * 1e3:.3f})", flush=True)
    d.close()
    p.close()


if __name__ == "__main__":
    main()
