"""Goodput of saved cluster runs (bench/cluster_gpu.py JSON) at other SLOs than the stated one.

Every request's TTFT and TPOT are kept in the run's JSON, so the goodput (the highest rate with
>= 90% of requests meeting both targets, interpolated as bench/goodput_real.py) can be read off
at any target afterwards. Each run/shape/policy becomes one row per workload; the columns are the
TPOT targets, the TTFT target stays the workload's own unless --ttft-s is given.

    python bench/slo_sweep.py bench/results/cluster-gpu-x2-pair-v2.json.gz \
        bench/results/cluster-gpu-x2-pair-slo2.json.gz --tpot-ms 10,15,20,30
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.goodput_real import attainment, goodput  # noqa: E402


def load(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def sweep(res: dict, tpots: list[float], ttft: float | None) -> list[tuple[str, str, str, list[str]]]:
    """(shape, policy, workload, goodput cells) for each shape and workload of one run."""
    out = []
    for shape, s in res["shapes"].items():
        for wname, w in s["workloads"].items():
            t = ttft if ttft is not None else res["workloads"][wname]["slo"]["ttft_s"]
            cells = []
            for tp in tpots:
                pts = [{"rate": p["rate"], "attainment": attainment(p["rows"], t, tp)} for p in w["points"]]
                g = goodput(pts)
                cells.append(f"{'>= ' if pts and g == pts[-1]['rate'] else ''}{g:.2f}")
            out.append((shape, s["policy"], wname, cells))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="bench/cluster_gpu.py JSON files (.json or .json.gz)")
    ap.add_argument("--tpot-ms", default="10,15,20,30")
    ap.add_argument("--ttft-s", type=float, default=None, help="one TTFT target for all (default: each workload's)")
    a = ap.parse_args()
    tpots = [float(x) / 1e3 for x in a.tpot_ms.split(",")]
    lines = ["| run | shape | policy | workload | " + " | ".join(f"TPOT {x * 1e3:g} ms" for x in tpots) + " |",
             "|---|---|---|---|" + "---:|" * len(tpots)]
    for path in a.results:
        res = load(path)
        for shape, policy, wname, cells in sweep(res, tpots, a.ttft_s):
            lines.append(f"| {Path(path).name} | {shape} | {policy} | {wname} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
