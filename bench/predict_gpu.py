"""The simulator's prediction for bench/cluster_gpu.py shapes before they run on GPUs.

Stated ahead of a run (issue 8 asks for 1P3D / 2P2D / 3P1D on four H200s against the simulator):
the same seeded requests bench/cluster_gpu.py will send (point_requests), the same step budget and
batch cap, a cost profile fitted on the H200 (bench/profile_engine.py --device cuda). Per shape,
workload and rate: TTFT/TPOT p50/p90/p99, attainment at the workload's SLO, and goodput.
After the real run, bench/validate_sim_gpu.py compares point by point.

    python bench/predict_gpu.py --tag four     # the rates of `bench/multigpu_run.sh four`
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
from bench.cluster_gpu import WORKLOADS, parse_shape, point_requests  # noqa: E402
from bench.goodput_real import goodput  # noqa: E402
from bench.validate_sim import git_commit, pct  # noqa: E402
from bench.validate_sim_gpu import simulate  # noqa: E402


def predict_point(reqs: list, policy: str, p: int, d: int, cost, cfg: dict, slo: tuple[float, float]) -> dict:
    res = simulate(reqs, policy, p, d, cost, cfg)
    served = [r for r in res.requests if not r.rejected]
    out = {"rate": round(wl.offered_rate(reqs), 3), "requests": len(reqs), "served": len(served),
           "attainment": round(sum(r.ttft_s <= slo[0] and r.tpot_s <= slo[1] for r in served) / max(len(reqs), 1), 3)}
    for k in ("ttft", "tpot"):
        for q in (50, 90, 99):
            out[f"{k}_p{q}"] = round(pct([getattr(r, f"{k}_s") for r in served], q), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="1P3D,2P2D,3P1D,4D")
    ap.add_argument("--workloads", default="chat,long")
    ap.add_argument("--rates", default="chat=16,32,64;long=3,6,9", help="as bench/multigpu_run.sh four")
    ap.add_argument("--disagg-policy", default="load_aware")
    ap.add_argument("--profile", default="h200-llama3-8b-profiled")
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    from splitserve.router.cost_model import load_profile
    cost = load_profile(a.profile)
    from splitserve.config import RouterConfig
    cfg = {"chunk": a.chunk, "max_seqs": a.max_seqs, "overlap_reserve": RouterConfig().overlap_reserve}
    rates = dict(part.split("=") for part in filter(None, a.rates.split(";")))
    res = {"date": date.today().isoformat(), "commit": git_commit(),
           "command": "python bench/predict_gpu.py " + " ".join(sys.argv[1:]), "profile": cost.name, "shapes": {}}
    lines = [f"# Simulator prediction for GPU cluster shapes ({res['date']}, commit `{res['commit']}`)", "",
             f"- Command: `{res['command']}`",
             f"- Profile `{cost.name}`: {cost.source.get('command')} (commit {cost.source.get('commit')})",
             "- Requests: bench/cluster_gpu.py's own (same seeds), so a real run compares point by point "
             "(bench/validate_sim_gpu.py).", "",
             "| workload | SLO TTFT/TPOT | shape | policy | rate | attain | TTFT p50/p90/p99 (s) | TPOT p50/p90/p99 (ms) |",
             "|---|---|---|---|---:|---:|---|---|"]
    goodputs = []
    for wname in a.workloads.split(","):
        if wname not in WORKLOADS:
            raise SystemExit(f"unknown workload {wname!r} (choose from {', '.join(WORKLOADS)})")
        _, slo, _, n_req = WORKLOADS[wname]
        for shape in a.shapes.split(","):
            p, d, kind = parse_shape(shape)
            policy = a.disagg_policy if kind == "disagg" else "colocated"
            pts = []
            for rate in (float(x) for x in rates[wname].split(",")):
                reqs = point_requests(wname, rate, n_req, a.seed, a.max_model_len)
                pt = {"nominal_rate": rate, **predict_point(reqs, policy, p, d, cost, cfg, slo)}
                pts.append(pt)
                lines.append(f"| {wname} | {slo[0]} s / {slo[1] * 1e3:.0f} ms | {shape} | {policy} | {pt['rate']:.2f} | "
                             f"{pt['attainment']:.2f} | {pt['ttft_p50']:.3f} / {pt['ttft_p90']:.3f} / {pt['ttft_p99']:.3f} | "
                             f"{pt['tpot_p50'] * 1e3:.1f} / {pt['tpot_p90'] * 1e3:.1f} / {pt['tpot_p99'] * 1e3:.1f} |")
            g = goodput(pts)
            res["shapes"].setdefault(shape, {"policy": policy, "workloads": {}})["workloads"][wname] = \
                {"points": pts, "goodput": g}
            goodputs.append(f"| {wname} | {shape} | {'>= ' if g == pts[-1]['rate'] else ''}{g:.2f} |")
    lines += ["", "| workload | shape | predicted goodput (req/s, >= 90% meet both) |", "|---|---|---:|", *goodputs]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("predict-sim-gpu" + (f"-{a.tag}" if a.tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
