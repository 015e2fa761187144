"""Where a small KV handoff's time goes: control round trips, executor hops and whole transfers
under each UCX progress mode, between two processes (CPU loopback or one/two GPUs).

    python bench/transfer_latency.py --device cpu
    python bench/transfer_latency.py --device cuda --out $OUT

Per progress mode (transfer.progress_mode): ping->pong round trips between the agents (the
floor of each protocol step), an empty executor hop on the agent loop, and median open ->
verified Success of 1, 16 and 256-block transfers (contiguous and scattered, Llama-3-8B block
size) beside a raw ucxx send + ack of the same bytes. Writes transfer-latency-<device>[-tag].json/.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transfer as tb   # noqa: E402  (bench/transfer.py: package mapping, layout, phases)

MIB = 1 << 20


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_mode(mode: str, switch_ms: float, spin_us: int, args) -> dict:
    from splitserve.kvtransfer.testing import spawn_worker
    sizes = [int(s) for s in args.sizes.split(",")]
    nb = max(max(sizes) * 2, 64)
    layout = dict(tb.LLAMA3_8B, num_blocks=nb)
    cfg = {"self_test": False, "lease_timeout_s": 600.0, "progress_mode": mode, "spin_us": spin_us}
    gp, gd = (args.gpus.split(",") + [""])[:2] if args.gpus else ("", "")
    env = (lambda own: {"CUDA_VISIBLE_DEVICES": own} if own else None)
    d = spawn_worker(layout, seed=1, config_kw=cfg, device=args.device, start_timeout=600, env=env(gd))
    p = spawn_worker(layout, seed=2, config_kw=cfg, device=args.device, start_timeout=600, env=env(gp))
    try:
        for w in (d, p):   # the GIL hand-off interval of both processes (Python's default: 5 ms)
            w.call("exec", f"import sys; sys.setswitchinterval({switch_ms / 1e3})")
        p.call("rtt", d.address, 5)
        rtt = p.call("rtt", d.address, args.reps * 4)
        hop = p.call("executor_hop", args.reps * 4)
        d.call("raw_connect", p.address)
        rnd, tag, rows = random.Random(0), 0x5D00_0000_0000_0000, []
        for n in sizes:
            raw = []
            for _ in range(args.reps + 1):
                tag += 2
                d.call("raw_recv", n * 2 * MIB, tag)
                raw.append(p.call("raw_send", d.address, n * 2 * MIB, tag, timeout=600))
            for pattern in ("contiguous", "scattered"):
                times, phases = [], {}
                for r in range(args.reps + 1):
                    dst = list(range(n)) if pattern == "contiguous" else rnd.sample(range(nb), n)
                    src = list(range(n)) if pattern == "contiguous" else rnd.sample(range(nb), n)
                    h = d.call("reserve", ids=dst)
                    res = p.call("timed_send", h, src, timeout=600)
                    if res["state"] != "success":
                        raise SystemExit(f"{mode}: transfer failed: {res}")
                    assert d.call("wait_lease", h["lease_id"], 60)[0] == "success"
                    if r == 0:
                        assert d.call("digest", dst) == p.call("digest", src), "bytes differ"
                    else:
                        times.append(res["seconds"])
                        rx = d.call("rx_trace", h["lease_id"])
                        timeline = sorted([(round((t - res["t0"]) * 1e3, 3), "P " + k) for k, t in res["trace"]]
                                          + [(round((t - res["t0"]) * 1e3, 3), "D " + k) for k, t in rx])
                        for k, v in tb.phase_times(res, d.call("rx_trace", h["lease_id"])).items():
                            phases.setdefault(k, []).append(v)
                    d.call("release_completed", dst)
                row = {"blocks": n, "pattern": pattern, "bytes": n * 2 * MIB,
                       "paged_ms": statistics.median(times) * 1e3,
                       "raw_ms": statistics.median(raw[1:]) * 1e3,
                       "phases_ms": {k: round(statistics.median(v), 3) for k, v in phases.items()},
                       "last_timeline_ms": timeline}
                row["ratio"] = row["raw_ms"] / row["paged_ms"]
                rows.append(row)
                print(f"[{mode} {switch_ms}ms spin {spin_us}us] {n:4d} {pattern:10s} paged {row['paged_ms']:7.2f} ms raw "
                      f"{row['raw_ms']:6.2f} ms ({row['ratio']:.2f}x)", flush=True)
        overlap = []
        if args.device == "cuda" and args.overlap_reps:
            for _ in range(args.overlap_reps):   # layer-wise streaming behind a prefill-shaped forward
                h = d.call("reserve", ids=rnd.sample(range(nb), 256))
                ov = p.call("overlapped_send", h, rnd.sample(range(nb), 256), 4096, 4096, 14336, timeout=600,
                            layer_kind=args.overlap_layer)
                rx = dict(d.call("rx_trace", h["lease_id"]))
                overlap.append({"exposed_ms": ov["exposed_s"] * 1e3, "layer_ms": ov["layer_s"] * 1e3,
                                "decode_verified_ms": (rx.get("ack_send", float("nan")) - ov["t0"]) * 1e3})
                d.call("release_completed", h["block_ids"])
            print(f"[{mode} {switch_ms}ms spin {spin_us}us] overlap exposed " + ", ".join(
                f"{o['exposed_ms']:.2f} ms (decode verified {o['decode_verified_ms']:.2f})" for o in overlap), flush=True)
        out = {"mode": mode, "switch_interval_ms": switch_ms, "spin_us": spin_us, "overlap": overlap, "rtt_ms": {"p50": pct(rtt, .5) * 1e3, "p90": pct(rtt, .9) * 1e3,
                                        "min": min(rtt) * 1e3},
               "executor_hop_ms": {"p50": pct(hop, .5) * 1e3, "p90": pct(hop, .9) * 1e3},
               "rows": rows, "transports": p.call("peer_transports")}
        print(f"[{mode} {switch_ms}ms spin {spin_us}us] rtt p50 {out['rtt_ms']['p50']:.3f} ms p90 {out['rtt_ms']['p90']:.3f}; "
              f"executor hop p50 {out['executor_hop_ms']['p50']:.3f} ms", flush=True)
        return out
    finally:
        d.close()
        p.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default="thread,thread-polling")
    ap.add_argument("--sizes", default="1,16,256")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--switch-ms", default="5", help="sys.setswitchinterval values (ms) to compare")
    ap.add_argument("--spin-us", default="2000", help="transfer.spin_us values to compare")
    ap.add_argument("--overlap-reps", type=int, default=3, help="cuda: layer-wise overlap runs per config")
    ap.add_argument("--overlap-layer", default="matmul2", help="matmul2 or llama (testing.overlapped_send)")
    ap.add_argument("--gpus", default="", help="P,D GPUs (default: both processes share one)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(tb.ROOT / "bench" / "results"))
    args = ap.parse_args()
    modes = [run_mode(m, float(sw), int(sp), args) for sp in args.spin_us.split(",")
             for sw in args.switch_ms.split(",") for m in args.modes.split(",")]
    rep = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": tb.commit(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "device": args.device, "modes": modes}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"transfer-latency-{args.device}" + (f"-{args.tag}" if args.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(rep, indent=1))
    lines = [f"# KV handoff latency by UCX progress mode, {args.device} ({rep['date']}, commit {rep['commit']})",
             "", f"Command: `python bench/{rep['command']}`", "",
             "| mode | GIL switch ms | spin us | ping-pong p50 ms | p90 ms | executor hop p50 ms | overlap exposed ms (decode verified) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for m in modes:
        ov = ", ".join(f"{o['exposed_ms']:.2f} ({o['decode_verified_ms']:.2f})" for o in m["overlap"]) or "-"
        lines.append(f"| {m['mode']} | {m['switch_interval_ms']} | {m.get('spin_us', '')} | {m['rtt_ms']['p50']:.3f} | {m['rtt_ms']['p90']:.3f} | "
                     f"{m['executor_hop_ms']['p50']:.3f} | {ov} |")
    lines += ["", "| mode | GIL switch ms | spin us | blocks | pattern | paged ms | raw ms | paged/raw |",
              "|---|---:|---:|---:|---|---:|---:|---:|"]
    for m in modes:
        for r in m["rows"]:
            lines.append(f"| {m['mode']} | {m['switch_interval_ms']} | {m.get('spin_us', '')} | {r['blocks']} | {r['pattern']} | "
                         f"{r['paged_ms']:.2f} | {r['raw_ms']:.2f} | {r['ratio']:.2f}x |")
    lines += ["", "Phases (median ms from open):", ""]
    for m in modes:
        for r in m["rows"]:
            lines.append(f"- {m['mode']} switch {m['switch_interval_ms']} ms spin {m.get('spin_us')} us, {r['blocks']} {r['pattern']}: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in r["phases_ms"].items()))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
