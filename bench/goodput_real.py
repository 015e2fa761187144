"""Goodput on the real local cluster (small scale): SLO attainment vs request rate for
round_robin (disaggregated 1P+1D), colocated (2 decode workers, local prefill) and slo_aware
(1P+1D, local-vs-remote by predicted TTFT, admission control), same number of workers.

One cluster per policy; the rates run on it in increasing order, each with fresh synthesized
tokens (no cross-run prefix hits). Refused requests (RESOURCE_EXHAUSTED) count as misses.
Goodput = highest offered rate with >= 90% of requests meeting both TTFT and TPOT (linear
interpolation at the first crossing, as bench/simulator.py). The simulator's prediction for the
same workload, shapes and profile is reported beside each point.

    python bench/goodput_real.py [--rates 0.5,1,2] [--requests 30] [--ttft 2.0 --tpot 0.25]

Writes bench/results/goodput-real-<date>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import workloads as wl  # noqa: E402
from bench.validate_sim import RealCluster, git_commit, pct, run_requests, simulate  # noqa: E402

SHAPES = {"round_robin": (1, 1), "colocated": (0, 2), "slo_aware": (1, 1)}


def workload(n: int, rate: float, seed: int) -> list[wl.Request]:
    from bench.validate_sim import short_chat
    return short_chat(n, rate, seed)


def attainment(rows: list[dict], ttft: float, tpot: float) -> float:
    return sum(r["status"] == "OK" and r["ttft_s"] <= ttft and r["tpot_s"] <= tpot for r in rows) / max(len(rows), 1)


def goodput(points: list[dict], key: str = "attainment", target: float = 0.9) -> float:
    prev = None
    for p in points:
        if p[key] < target:
            if prev is None:
                return 0.0
            f = (prev[key] - target) / max(prev[key] - p[key], 1e-9)
            return round(prev["rate"] + f * (p["rate"] - prev["rate"]), 3)
        prev = p
    return prev["rate"] if prev else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="0.5,1,2")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--policies", default="round_robin,colocated,slo_aware")
    ap.add_argument("--ttft", type=float, default=2.0, help="TTFT SLO, seconds")
    ap.add_argument("--tpot", type=float, default=0.25, help="TPOT SLO, seconds")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--profile", default="cpu-smollm2")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--append", default="", help="merge this run's points into a saved goodput-real JSON")
    a = ap.parse_args()
    from splitserve.router.cost_model import load_profile
    from splitserve.router.slo_policy import SLO
    cost, slo = load_profile(a.profile), SLO(a.ttft, a.tpot)
    rates = [float(x) for x in a.rates.split(",")]
    res = {"date": date.today().isoformat(), "commit": git_commit(), "command": "python " + " ".join(sys.argv),
           "machine": "2-core shared CPU VM (other sessions' tests running), SmolLM2-135M fp32, 1 thread/worker",
           "workload": f"short_chat: {a.requests} requests, Poisson, prompts median ~140 (<=1500) tokens, "
                       f"outputs 16-32, seed {a.seed}",
           "slo": {"ttft_s": a.ttft, "tpot_s": a.tpot}, "profile": a.profile, "policies": {}}
    out = Path(a.out)
    old = json.loads(Path(a.append).read_text()) if a.append else None
    if old:
        res["policies"] = old["policies"]
        res["command"] = old["command"] + " ; then " + res["command"]
    for pol in a.policies.split(","):
        p, d = SHAPES[pol]
        rc = RealCluster(pol, p, d, slo_ms=(a.ttft * 1e3, a.tpot * 1e3), profile=a.profile)
        pts = []
        try:
            rc.warm_up()
            for i, rate in enumerate(rates):
                reqs = workload(a.requests, rate, a.seed)
                run = run_requests(rc, reqs, token_seed=500 + i)
                rows = run["rows"]
                ok = [r for r in rows if r["status"] == "OK"]
                sim = simulate(reqs, pol, p, d, cost, slo)
                pt = {"rate": round(wl.offered_rate(reqs), 3), "nominal_rate": rate,
                      "attainment": round(attainment(rows, a.ttft, a.tpot), 3),
                      "refused": sum(r["status"] == "RESOURCE_EXHAUSTED" for r in rows),
                      "errors": sum(r["status"] not in ("OK", "RESOURCE_EXHAUSTED") for r in rows),
                      "remote_frac": round(sum(r["remote"] for r in ok) / max(len(ok), 1), 2),
                      "ttft_p50": round(pct([r["ttft_s"] for r in ok], 50), 3),
                      "ttft_p90": round(pct([r["ttft_s"] for r in ok], 90), 3),
                      "tpot_p50": round(pct([r["tpot_s"] for r in ok], 50), 4),
                      "tpot_p90": round(pct([r["tpot_s"] for r in ok], 90), 4),
                      "sim_attainment": round(sim.attainment(slo), 3),
                      "loadavg": [run["loadavg_start"], run["loadavg_end"]], "wall_s": round(run["wall_s"], 1),
                      "rows": rows}
                pts.append(pt)
                print(pol, {k: v for k, v in pt.items() if k != "rows"}, flush=True)
                Path("/tmp/goodput-real-partial.json").write_text(json.dumps(res | {"partial": {pol: pts}}))
        finally:
            rc.stop()
        if old and pol in old["policies"]:
            pts = sorted(old["policies"][pol]["points"] + pts, key=lambda q: q["rate"])
        res["policies"][pol] = {"shape": f"{p}P+{d}D" if p else f"{d}D", "points": pts,
                                "goodput": goodput(pts), "sim_goodput": goodput(pts, "sim_attainment")}
        (out / f"goodput-real-{res['date']}.json").write_text(json.dumps(res, indent=1) + "\n")
    write_report(res, out)


def write_report(res: dict, out: Path) -> None:
    stem = out / f"goodput-real-{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    s = res["slo"]
    lines = [f"# Goodput on the real local cluster ({res['date']}, commit `{res['commit']}`)", "",
             f"- Command: `{res['command']}`", f"- Machine: {res['machine']}", f"- Workload: {res['workload']}",
             f"- SLO: TTFT <= {s['ttft_s']} s and TPOT <= {s['tpot_s'] * 1e3:.0f} ms; goodput = highest offered rate "
             "with >= 90% of requests meeting both (refused = miss). sim = the simulator with profile "
             f"`{res['profile']}` on the same requests and shape.", "",
             "| policy | shape | goodput (req/s) | sim goodput |", "|---|---|---:|---:|"]
    for pol, v in res["policies"].items():
        lines.append(f"| {pol} | {v['shape']} | {v['goodput']:.2f} | {v['sim_goodput']:.2f} |")
    lines += ["", "| policy | rate (req/s) | attainment | sim attainment | refused | remote | TTFT p50/p90 (s) | "
              "TPOT p50/p90 (ms) | load avg |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
    for pol, v in res["policies"].items():
        for p in v["points"]:
            lines.append(f"| {pol} | {p['rate']:.2f} | {p['attainment']:.2f} | {p['sim_attainment']:.2f} | "
                         f"{p['refused']} | {p['remote_frac']:.2f} | {p['ttft_p50']:.2f} / {p['ttft_p90']:.2f} | "
                         f"{p['tpot_p50'] * 1e3:.0f} / {p['tpot_p90'] * 1e3:.0f} | {p['loadavg'][0]:.1f}-{p['loadavg'][1]:.1f} |")
    lines += [""] + res.get("notes", [])
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for i, (pol, v) in enumerate(res["policies"].items()):
            c = f"C{i}"
            ax.plot([p["rate"] for p in v["points"]], [p["attainment"] for p in v["points"]], "o-", color=c,
                    label=f"{pol} {v['shape']} (real)")
            ax.plot([p["rate"] for p in v["points"]], [p["sim_attainment"] for p in v["points"]], "x--", color=c,
                    alpha=0.6, label=f"{pol} (sim)")
        ax.axhline(0.9, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("offered rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"Real 2-worker CPU cluster, TTFT<={s['ttft_s']}s TPOT<={s['tpot_s'] * 1e3:.0f}ms", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print("\n".join(lines))


if __name__ == "__main__":
    main()
