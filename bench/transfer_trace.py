"""Where does one paged transfer's time go? Merged sender/receiver timeline (both processes on one
host: perf_counter is CLOCK_MONOTONIC, comparable). Diagnostic, not a result.

    python bench/transfer_trace.py --device cpu --blocks 1,16 --reps 5
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer as _bench  # noqa: F401,E402  (package mapping on the device)

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")


# cProfile on the agent's loop thread (enable/disable run there: a profiler hooks its own thread)
_PROFILE_ON = ("import cProfile; self._prof = cProfile.Profile(); "
               "self.agent.loop.call_soon_threadsafe(self._prof.enable)")
_PROFILE_OFF = ("import io, os, pstats, time; self.agent.loop.call_soon_threadsafe(self._prof.disable); "
                "time.sleep(0.2); os.makedirs(os.path.dirname('{out}'), exist_ok=True); buf = io.StringIO(); "
                "st = pstats.Stats(self._prof, stream=buf); st.sort_stats('tottime').print_stats(45); "
                "st.sort_stats('cumulative').print_stats(60); open('{out}', 'w').write(buf.getvalue())")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", default="1,16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--show", type=int, default=1, help="timelines printed per case")
    ap.add_argument("--profile", default="", help="directory: cProfile each worker's agent loop "
                    "thread over the timed reps, write its top functions there")
    ap.add_argument("--ab", default="", help="statement run in both workers before odd reps "
                    "(its 'undo' after '|' before even reps): interleaved A/B, medians of each")
    args = ap.parse_args()
    from splitserve.kvtransfer.testing import spawn_worker
    layout = dict(_bench.LLAMA3_8B, num_blocks=args.pool)
    cfg = {"self_test": False, "lease_timeout_s": 600.0, "staging_layers": 8 if args.device == "cuda" else 4}
    d = spawn_worker(layout, seed=1, config_kw=cfg, device=args.device)
    p = spawn_worker(layout, seed=2, config_kw=cfg, device=args.device)
    rnd = random.Random(0)
    for n in [int(x) for x in args.blocks.split(",")]:
        for pattern in ("contiguous", "scattered"):
            dst, src = (list(range(n)), list(range(n))) if pattern == "contiguous" else \
                (rnd.sample(range(args.pool), n), rnd.sample(range(args.pool), n))
            secs, phases = [], {}
            ab = {0: [], 1: []}
            for r in range(args.reps + 1):
                if args.ab:
                    stmt = args.ab.split("|")[r % 2]
                    d.call("exec", stmt)
                    p.call("exec", stmt)
                h = d.call("reserve", ids=dst)
                res = p.call("timed_send", h, src)
                assert res["state"] == "success", res
                d.call("wait_lease", h["lease_id"], 60)
                rx = d.call("rx_trace", h["lease_id"])
                d.call("release_completed", dst)
                if r == 0:
                    if args.profile:
                        for w in (d, p):
                            w.call("exec", _PROFILE_ON)
                    continue
                secs.append(res["seconds"])
                ab[r % 2].append(res["seconds"])
                ev = [("P " + k, t) for k, t in res["trace"] if isinstance(t, float) and t > 1e3 or k not in ("prep_total", "send_calls")]
                ev = [(k, t) for k, t in ev if k[2:] not in ("prep_total", "send_calls")]
                ev += [("D " + k, t) for k, t in rx]
                ev.sort(key=lambda e: e[1])
                t0 = res["t0"]
                for k, t in ev:
                    key = k if not (" sent " in k or " recv " in k or "prep" in k) else k.split()[0] + " " + k.split()[1]
                    phases.setdefault(key, []).append((t - t0) * 1e3)
                if r <= args.show:
                    print(f"--- {n} blocks {pattern} rep {r}: {res['seconds'] * 1e3:.2f} ms, "
                          f"prep {res['prep_s'] * 1e3:.2f} ms, send calls {res['send_s'] * 1e3:.2f} ms")
                    last = t0
                    shown = 0
                    for k, t in ev:
                        if (" sent " in k or " recv " in k) and shown > 6 and k is not ev[-1][0]:
                            continue
                        shown += 1
                        print(f"   {(t - t0) * 1e3:8.2f} (+{(t - last) * 1e3:6.2f})  {k}")
                        last = t
            if args.profile:
                for name, w in (("decode", d), ("prefill", p)):
                    w.call("exec", _PROFILE_OFF.format(out=f"{args.profile}/{name}-{n}-{pattern}.txt"))
            print(f"=== {n} blocks {pattern}: median {statistics.median(secs) * 1e3:.2f} ms "
                  f"(min {min(secs) * 1e3:.2f})")
            if args.ab:
                print(f"    A/B: {args.ab.split('|')[1]!r} median {statistics.median(ab[1]) * 1e3:.2f} ms"
                      f" | {args.ab.split('|')[0]!r} median {statistics.median(ab[0]) * 1e3:.2f} ms")
            for k in ("P open", "P begin_sent", "D begin_rx", "D posted", "P ready", "P posted",
                      "P sent", "P sums", "D complete_rx", "D recvs_done", "D checksummed",
                      "D ack_send", "P acked"):
                if k in phases:
                    print(f"   {k:16s} median {statistics.median(phases[k]):8.2f} ms")
    d.close()
    p.close()


if __name__ == "__main__":
    main()
