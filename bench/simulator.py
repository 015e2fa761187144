"""Cluster simulator CLI: goodput curves per policy, and what-if (how many P and D?).

Driven by the same cost model (router/cost_model.py, a profile from router/profiles/) and the
same policy classes the router runs (router.policy, router.slo_policy). Goodput (DistServe):
the highest request rate at which >= 90% of requests meet both their TTFT and TPOT targets;
refused requests count as misses.

    python bench/simulator.py goodput --workload mooncake --gpus 8 [--out bench/results]
    python bench/simulator.py whatif --workload mooncake --rate 10 --gpus 8
    python bench/simulator.py run --workload multi_turn --policy slo_aware --prefill 2 --decode 2 --scale 1
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import workloads as wl  # noqa: E402
from bench.sim.cluster import ClusterSpec, SimResult, Simulator  # noqa: E402
from splitserve.router.cost_model import CostModel, load_profile  # noqa: E402
from splitserve.router.policy import ColocatedPolicy, LoadAwarePolicy, RoundRobinPolicy  # noqa: E402
from splitserve.router.slo_policy import SLO, SLOAwarePolicy, SLOPolicyConfig  # noqa: E402

ATTAINMENT = 0.9


@dataclass(frozen=True)
class Setup:
    """One policy on one cluster shape."""
    policy: str                 # round_robin | colocated | slo_aware
    num_prefill: int
    num_decode: int
    chunk_tokens: int = 512
    max_seqs: int | None = None    # a decode worker's batch seats (the engine's max_num_seqs)

    @property
    def label(self) -> str:
        shape = f"{self.num_decode}D" if self.policy == "colocated" else f"{self.num_prefill}P+{self.num_decode}D"
        seats = f" seats{self.max_seqs}" if self.max_seqs else ""
        return f"{self.policy} {shape} chunk{self.chunk_tokens}{seats}"


def make_policy(name: str, cost: CostModel, slo: SLO, chunk_tokens: int = 512):
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "colocated":
        return ColocatedPolicy()
    if name == "slo_aware":
        return SLOAwarePolicy(cost, SLOPolicyConfig(slo=slo, local_chunk_tokens=chunk_tokens))
    if name == "slo_aware_no_admission":  # ablation: same placement, every request admitted
        return _PlaceOnly(make_policy("slo_aware", cost, slo, chunk_tokens))
    if name == "load_aware":
        return LoadAwarePolicy(512)
    raise ValueError(f"unknown policy {name!r} (round_robin, colocated, slo_aware, slo_aware_no_admission, "
                     "load_aware)")


class _PlaceOnly:
    def __init__(self, inner):
        self.inner = inner

    def place(self, *args, **kw):
        return self.inner.place(*args, **kw)


def simulate(reqs: list[wl.Request], setup: Setup, cost: CostModel, slo: SLO,
             transfer_bw: float | None = None) -> SimResult:
    spec = ClusterSpec(0 if setup.policy == "colocated" else setup.num_prefill, setup.num_decode,
                       setup.chunk_tokens, transfer_bw, max_seqs=setup.max_seqs)
    return Simulator(spec, cost, make_policy(setup.policy, cost, slo, setup.chunk_tokens)).run(reqs)


def base_workload(name: str, n: int, seed: int) -> list[wl.Request]:
    """The workload at scale 1 (its own arrival rate); `goodput` compresses time to raise the rate."""
    if name == "mooncake":
        return wl.mooncake_trace(limit=n)
    if name == "multi_turn":
        return wl.multi_turn(sessions=max(n // 6, 1), turns=6, rate=0.5, seed=seed)
    if name == "agentic":
        return wl.agentic(n, rate=2.0, seed=seed)
    if name == "long_context":
        return wl.long_context(n, rate=0.5, seed=seed)
    if name == "synthetic":
        return wl.synthetic(n, rate=4.0, seed=seed)
    if name == "bursty":
        return wl.synthetic(n, rate=4.0, seed=seed, burst_cv=3.0)
    raise ValueError(f"unknown workload {name!r}")


def curve(base: list[wl.Request], scales: list[float], setup: Setup, cost: CostModel, slo: SLO,
          transfer_bw: float | None = None) -> list[dict]:
    """Attainment vs offered rate; stops after two consecutive points below 50% (overloaded)."""
    pts, low = [], 0
    for s in scales:
        reqs = wl.scale_time(base, s)
        res = simulate(reqs, setup, cost, slo, transfer_bw)
        pts.append({"scale": s, "rate": round(wl.offered_rate(reqs), 3), **res.summary(slo)})
        low = low + 1 if pts[-1]["attainment"] < 0.5 else 0
        if low >= 2:
            break
    return pts


def goodput(points: list[dict], target: float = ATTAINMENT) -> float:
    """Highest rate meeting `target`: the first crossing below it, interpolated linearly."""
    prev = None
    for p in points:
        if p["attainment"] < target:
            if prev is None:
                return 0.0
            f = (prev["attainment"] - target) / max(prev["attainment"] - p["attainment"], 1e-9)
            return round(prev["rate"] + f * (p["rate"] - prev["rate"]), 3)
        prev = p
    return prev["rate"] if prev else 0.0


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def cmd_run(a) -> None:
    cost, slo = load_profile(a.profile), SLO(a.ttft, a.tpot)
    reqs = wl.scale_time(base_workload(a.workload, a.requests, a.seed), a.scale)
    t0 = time.perf_counter()
    res = simulate(reqs, Setup(a.policy, a.prefill, a.decode, a.chunk, a.max_seqs or None), cost, slo, a.transfer_gbps and a.transfer_gbps * 1e9)
    print(json.dumps({"rate": wl.offered_rate(reqs), **res.summary(slo), "wall_s": time.perf_counter() - t0}))


def cmd_whatif(a) -> None:
    """For a target rate, the smallest P+D (up to --gpus) whose SLO-aware attainment is >= 90%."""
    cost, slo = load_profile(a.profile), SLO(a.ttft, a.tpot)
    base = base_workload(a.workload, a.requests, a.seed)
    reqs = wl.scale_time(base, a.rate / max(wl.offered_rate(base), 1e-9))
    for n in range(2, a.gpus + 1):
        best = None
        for d in range(1, n):
            att = simulate(reqs, Setup("slo_aware", n - d, d, a.chunk, a.max_seqs or None), cost, slo).attainment(slo)
            best = max(best or (0, 0, 0), (att, n - d, d))
        print(f"{n} GPUs: best {best[1]}P+{best[2]}D attainment {best[0]:.3f}")
        if best[0] >= ATTAINMENT:
            print(f"answer: {best[1]} prefill + {best[2]} decode workers sustain {a.rate} req/s at "
                  f"TTFT<={slo.ttft_s}s TPOT<={slo.tpot_s * 1e3:.0f}ms")
            return
    print(f"no split of <= {a.gpus} GPUs meets the SLO at {a.rate} req/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "whatif", "goodput"):
        p = sub.add_parser(name)
        p.add_argument("--profile", default="h200-llama3-8b")
        p.add_argument("--workload", default="mooncake")
        p.add_argument("--requests", type=int, default=3000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--ttft", type=float, default=5.0, help="TTFT SLO, seconds")
        p.add_argument("--tpot", type=float, default=0.05, help="TPOT SLO, seconds")
        p.add_argument("--chunk", type=int, default=512, help="local prefill tokens per decode step")
        p.add_argument("--gpus", type=int, default=8)
        p.add_argument("--transfer-gbps", type=float, default=0.0, help="override transfer bandwidth, GB/s")
        p.add_argument("--max-seqs", type=int, default=0, help="batch seats per decode worker (0: unlimited)")
    sub.choices["run"].add_argument("--policy", default="slo_aware")
    sub.choices["run"].add_argument("--prefill", type=int, default=6)
    sub.choices["run"].add_argument("--decode", type=int, default=2)
    sub.choices["run"].add_argument("--scale", type=float, default=1.0)
    sub.choices["whatif"].add_argument("--rate", type=float, required=True)
    g = sub.choices["goodput"]
    g.add_argument("--scales", default="0.5,1,1.5,2,2.5,3,3.5,4,5,6,8")
    g.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    if a.cmd == "goodput":
        from bench.sim.report import cmd_goodput
        cmd_goodput(a)
    else:
        {"run": cmd_run, "whatif": cmd_whatif}[a.cmd](a)


if __name__ == "__main__":
    main()
