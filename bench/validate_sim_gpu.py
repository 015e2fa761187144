"""Validate the simulator against real GPU cluster runs (issue 7): bench/cluster_gpu.py's results.

bench/cluster_gpu.py serves seeded workloads on a real Ray cluster on H200s and saves every
request's TTFT/TPOT (router Complete timing). This script rebuilds each point's requests (the
generators are deterministic; the rebuilt prompt lengths and arrivals are checked against the saved
rows), simulates them on the same shape, policy, step token budget and batch cap with a cost
profile fitted on the same GPU (bench/profile_engine.py --device cuda), and reports predicted vs
measured TTFT/TPOT p50 and p90 per point, with the relative error.

    python bench/validate_sim_gpu.py bench/results/cluster-gpu-1d.json [more.json] \
        --profile h200-llama3-8b-profiled --out bench/results --tag h200

Shapes whose workers share one GPU (gpus_per_worker < 1) are skipped: the simulator gives every
worker its own accelerator.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cluster_gpu import parse_shape, point_requests  # noqa: E402
from bench.validate_sim import git_commit, pct  # noqa: E402

METRICS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")


def rebuild(point: dict, wname: str, cfg: dict) -> list:
    """The point's requests, checked against what the real run recorded."""
    reqs = point_requests(wname, point["nominal_rate"], cfg.get("requests") or len(point["rows"]),
                          cfg.get("seed", 11), cfg.get("max_model_len", 32768))
    got = sorted((r["rid"], r["prompt_tokens"], r["output_tokens"], round(r["arrival_s"], 6)) for r in point["rows"])
    want = sorted((r.rid, r.prompt_tokens, r.output_tokens, round(r.arrival_s, 6)) for r in reqs)
    if got != want:
        raise SystemExit(f"{wname} @ {point['nominal_rate']}: the rebuilt requests differ from the saved rows "
                         "(the workload generators changed since the run)")
    return reqs


def simulate(reqs: list, policy: str, p: int, d: int, cost, cfg: dict):
    from bench.sim.cluster import ClusterSpec, Simulator
    from bench.simulator import make_policy
    from splitserve.router.slo_policy import SLO
    chunk = cfg.get("chunk", cost.prefill_chunk_tokens)
    spec = ClusterSpec(p, d, chunk, None, max_new_tokens=None, engine_lock=True, max_seqs=cfg.get("max_seqs"),
                       overlap_reserve=cfg.get("overlap_reserve", False))
    return Simulator(spec, cost, make_policy(policy, cost, SLO(1.0, 0.03), chunk)).run(reqs)


def measured(point: dict) -> dict:
    ok = [r for r in point["rows"] if r["status"] == "OK"]
    return {f"{k}_p{q}": pct([r[f"{k}_s"] for r in ok], q) for k in ("ttft", "tpot") for q in (50, 90)}


def predicted(res) -> dict:
    served = [r for r in res.requests if not r.rejected]
    return {f"{k}_p{q}": pct([getattr(r, f"{k}_s") for r in served], q) for k in ("ttft", "tpot") for q in (50, 90)}


def validate(files: list[str], cost) -> list[dict]:
    rows = []
    for f in files:
        res = json.loads(gzip.decompress(Path(f).read_bytes()) if str(f).endswith(".gz") else Path(f).read_text())
        cfg = res["config"]
        if cfg.get("gpus_per_worker", 1.0) < 1:
            print(f"{f}: workers share a GPU (gpus_per_worker {cfg['gpus_per_worker']}): skipped")
            continue
        for shape, s in res["shapes"].items():
            p, d, _ = parse_shape(shape)
            for wname, w in s["workloads"].items():
                for point in w["points"]:
                    m = measured(point)
                    sim = predicted(simulate(rebuild(point, wname, cfg), s["policy"], p, d, cost, cfg))
                    err = {k: (sim[k] - m[k]) / m[k] if m[k] else None for k in METRICS}
                    rows.append({"file": Path(f).name, "commit": res["commit"], "shape": shape, "policy": s["policy"],
                                 "workload": wname, "rate": point["rate"], "requests": len(point["rows"]),
                                 "measured": m, "predicted": sim, "error": err})
    return rows


def report(rows: list[dict], cost, out: Path, tag: str, command: str) -> None:
    within = [all(abs(e) <= 0.2 for e in r["error"].values() if e is not None) for r in rows]
    res = {"date": date.today().isoformat(), "commit": git_commit(), "command": command, "profile": cost.name,
           "profile_source": {k: cost.source.get(k) for k in ("date", "commit", "command", "device", "rel_rmse")},
           "rows": rows, "points_within_20pct": sum(within), "points": len(rows)}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("validate-sim-gpu" + (f"-{tag}" if tag else ""))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Simulator vs real GPU cluster runs ({res['date']}, commit `{res['commit']}`)", "",
             f"- Command: `{command}`",
             f"- Profile `{cost.name}`: {cost.source.get('command')} (commit {cost.source.get('commit')}, "
             f"{cost.source.get('device')}, fit rel. RMSE {cost.source.get('rel_rmse')})",
             "- Measured: each request's router Complete timing in the real run (bench/cluster_gpu.py); predicted: the "
             "simulator on the same requests, shape, policy, step budget and batch cap. p50/p90 nearest rank.", "",
             "| run | shape | workload | rate | TTFT p50 meas/pred (err) | TTFT p90 | TPOT p50 | TPOT p90 | all within 20% |",
             "|---|---|---|---:|---|---|---|---|---|"]
    for r, ok in zip(rows, within):
        cells = []
        for k in METRICS:
            unit, fmt = (1e3, ".0f") if k.startswith("ttft") else (1e3, ".1f")
            e = r["error"][k]
            cells.append(f"{r['measured'][k] * unit:{fmt}} / {r['predicted'][k] * unit:{fmt}} ms "
                         f"({'n/a' if e is None else f'{e * 100:+.0f}%'})")
        lines.append(f"| {r['file']} | {r['shape']} | {r['workload']} | {r['rate']:.2f} | " + " | ".join(cells)
                     + f" | {'yes' if ok else 'no'} |")
    lines += ["", f"{sum(within)} of {len(rows)} points have all four numbers within 20%."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench/cluster_gpu.py JSON files")
    ap.add_argument("--profile", default="h200-llama3-8b-profiled")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    from splitserve.router.cost_model import load_profile
    cost = load_profile(a.profile)
    rows = validate(a.results, cost)
    if not rows:
        raise SystemExit("no point to validate")
    report(rows, cost, Path(a.out), a.tag, "python bench/validate_sim_gpu.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
