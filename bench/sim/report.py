"""`simulator.py goodput`: curves for the three policies, each at its best cluster shape, to md/json/png.

Every baseline gets the best of a few configurations (P:D splits for the disaggregated ones,
local chunk sizes for colocated) on the same number of GPUs, so the ratio is not won by
giving a baseline a bad shape.
"""
from __future__ import annotations

import json
import sys
import time
from datetime import date
from pathlib import Path

from splitserve.router.cost_model import load_profile
from splitserve.router.slo_policy import SLO

POLICIES = ("round_robin", "colocated", "slo_aware")


def setups(gpus: int, chunk: int, max_seqs: int | None = None):
    from bench.simulator import Setup
    splits = sorted({max(gpus - max(gpus // k, 1), 1) for k in (4, 3, 2)}, reverse=True)  # 8 -> 6, 5, 4 prefill
    out = {p: [Setup(p, s, gpus - s, chunk, max_seqs) for s in splits if 0 < s < gpus]
           for p in ("round_robin", "slo_aware")}
    out["colocated"] = [Setup("colocated", 0, gpus, c, max_seqs) for c in sorted({chunk, 2048})]
    return out


def cmd_goodput(a) -> None:
    from bench.simulator import base_workload, curve, git_commit, goodput
    cost, slo = load_profile(a.profile), SLO(a.ttft, a.tpot)
    base = base_workload(a.workload, a.requests, a.seed)
    scales = [float(s) for s in a.scales.split(",")]
    bw = a.transfer_gbps * 1e9 if a.transfer_gbps else None
    t0 = time.perf_counter()
    rows = []
    for pol, cands in setups(a.gpus, a.chunk, a.max_seqs or None).items():
        for st in cands:
            pts = curve(base, scales, st, cost, slo, bw)
            rows.append({"policy": pol, "setup": st.label, "goodput": goodput(pts), "points": pts})
            print(f"{st.label:40s} goodput {rows[-1]['goodput']:.3f} req/s", flush=True)
    best = {p: max((r for r in rows if r["policy"] == p), key=lambda r: r["goodput"]) for p in POLICIES}
    meta = {"date": date.today().isoformat(), "commit": git_commit(), "command": "python " + " ".join(sys.argv),
            "profile": a.profile, "workload": a.workload, "requests": len(base), "gpus": a.gpus,
            "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s}, "attainment_target": 0.9,
            "transfer_gbps": a.transfer_gbps or cost.transfer.bandwidth_Bps / 1e9,
            "wall_s": round(time.perf_counter() - t0, 1)}
    stem = Path(a.out) / f"goodput-sim-{a.workload}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps({**meta, "best": {p: best[p]["setup"] for p in POLICIES},
                                                "runs": rows}, indent=1) + "\n")
    Path(f"{stem}.md").write_text(render_md(meta, rows, best))
    plot(f"{stem}.png", meta, rows, best)
    print(Path(f"{stem}.md").read_text())


def render_md(meta: dict, rows: list[dict], best: dict) -> str:
    g = {p: best[p]["goodput"] for p in POLICIES}
    slo = meta["slo"]
    lines = [f"# Simulated goodput: {meta['workload']} ({meta['requests']} requests), {meta['gpus']} GPUs, "
             f"profile {meta['profile']}", "",
             f"- Date {meta['date']}, commit `{meta['commit']}`, {meta['wall_s']} s of CPU.",
             f"- Command: `{meta['command']}`",
             f"- SLO: TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s'] * 1e3:.0f} ms; goodput = highest offered "
             "rate with >= 90% of requests meeting both (refused requests count as misses).",
             f"- KV transfer bandwidth {meta['transfer_gbps']:.0f} GB/s.", "",
             "| policy | best setup | goodput (req/s) | vs round_robin | vs colocated |", "|---|---|---:|---:|---:|"]
    for p in POLICIES:
        rr = g[p] / g["round_robin"] if g["round_robin"] else float("inf")
        co = g[p] / g["colocated"] if g["colocated"] else float("inf")
        lines.append(f"| {p} | {best[p]['setup']} | {g[p]:.2f} | {rr:.2f}x | {co:.2f}x |")
    lines += ["", "All configurations tried:", "", "| setup | goodput (req/s) |", "|---|---:|"]
    lines += [f"| {r['setup']} | {r['goodput']:.2f} |" for r in rows]
    lines += ["", "Curves of the best setups (rate req/s: attainment, TTFT p90 s, TPOT p90 ms, refused, prefix hit, "
              "remote fraction):", ""]
    for p in POLICIES:
        lines.append(f"- **{best[p]['setup']}**: " + "; ".join(
            f"{q['rate']:.2f}: {q['attainment']:.2f}, {q['ttft_p90']:.2f}, {q['tpot_p90'] * 1e3:.0f}, "
            f"{q['rejected']}, {q['prefix_hit']:.2f}, {q['remote_frac']:.2f}" for q in best[p]["points"]))
    return "\n".join(lines) + "\n"


def plot(path: str, meta: dict, rows: list[dict], best: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"round_robin": "tab:red", "colocated": "tab:blue", "slo_aware": "tab:green"}
    for r in rows:
        xs, ys = [q["rate"] for q in r["points"]], [q["attainment"] for q in r["points"]]
        is_best = r is best[r["policy"]]
        ax.plot(xs, ys, "o-" if is_best else ":", color=colors[r["policy"]], alpha=1.0 if is_best else 0.35,
                label=f"{r['setup']} ({r['goodput']:.2f} req/s)" if is_best else None)
    ax.axhline(0.9, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("offered rate (req/s)")
    ax.set_ylabel("SLO attainment")
    slo = meta["slo"]
    ax.set_title(f"{meta['workload']}, {meta['gpus']}x H200 (simulated), TTFT<={slo['ttft_s']}s "
                 f"TPOT<={slo['tpot_s'] * 1e3:.0f}ms", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
