"""Validate the simulator against the real local cluster (issue 7).

Runs seeded workloads from bench/workloads.py, scaled to this 2-core CPU machine (SmolLM2-135M,
prompts <= ~1500 tokens as real token ids from `synthesize_prompt`, 16-32 output tokens), on a
real `ServingCluster` (Ray actors, gRPC client, Poisson arrivals) and measures each request's
TTFT and TPOT from the router's Complete timing. Then simulates the same requests on the same
cluster shape and policy with a cost profile (default cpu-smollm2) and reports predicted vs
measured p50/p90 and the relative error. Writes bench/results/validate-sim-<date>.{json,md}.

    python bench/validate_sim.py [--repeats 2] [--policy round_robin] [--prefill 1 --decode 1]
    python bench/validate_sim.py --resim bench/results/validate-sim-DATE.json   # re-simulate saved runs

The real-cluster helpers (`RealCluster`, `run_requests`) are shared with bench/goodput_real.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import workloads as wl  # noqa: E402

OUT_MIN, OUT_MAX, PROMPT_MAX = 16, 32, 1500
KV_GIB = 0.5          # KV cache per worker (0.5 GiB = 11.6k SmolLM2 tokens in fp32)


# ---------------------------------------------------------------------- workloads at CPU scale
def _clip(reqs: list[wl.Request]) -> list[wl.Request]:
    return [replace(r, prompt_tokens=min(max(r.prompt_tokens, 8), PROMPT_MAX),
                    output_tokens=min(max(r.output_tokens, OUT_MIN), OUT_MAX)) for r in reqs]


def short_chat(n: int = 30, rate: float = 0.6, seed: int = 1) -> list[wl.Request]:
    """ShareGPT-like chat turns (median 160-token prompts, 16-32 outputs), Poisson arrivals."""
    return _clip(wl.synthetic(n, rate, seed=seed, prompt_median=160, output_median=24))


def long_multi_turn(sessions: int = 4, turns: int = 3, rate: float = 0.1, n_long: int = 4,
                    seed: int = 2) -> list[wl.Request]:
    """Multi-turn sessions over a shared 512-token system prompt (growing histories, prefix hits
    for real) mixed with long single documents (768-1200 tokens)."""
    mt = wl.multi_turn(sessions, turns, rate, seed=seed, system_tokens=512, user_median=96,
                       output_median=24, think_s=10.0)
    span = mt[-1].arrival_s if mt else 10.0
    lc = wl.long_context(n_long, n_long / span, seed=seed + 100, lo=768, hi=1200, output_median=24)
    lc = [replace(r, hash_ids=tuple(h + (1 << 41) for h in r.hash_ids)) for r in lc]  # disjoint ids
    merged = sorted(mt + lc, key=lambda r: r.arrival_s)
    return _clip([replace(r, rid=i) for i, r in enumerate(merged)])


WORKLOADS = {"short_chat": short_chat, "long_multi_turn": long_multi_turn}


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile, the simulator's definition (bench/sim/cluster._pct)."""
    xs = sorted(xs)
    return xs[min(int(len(xs) * q / 100), len(xs) - 1)] if xs else float("nan")


# ---------------------------------------------------------------------- the real cluster
class RealCluster:
    """A ServingCluster on a local Ray cluster (its own event-loop thread) and a gRPC client."""

    def __init__(self, policy: str, num_prefill: int, num_decode: int, slo_ms: tuple[float, float] = (2000, 100),
                 profile: str = "cpu-smollm2", config=None):
        from splitserve.config import Config
        from splitserve.deploy.ray_cluster import ServingCluster
        cfg = ((config or Config().replace("model", device="cpu").replace("cache", cpu_cache_gib=KV_GIB)
                .replace("transfer", self_test=False))
               .replace("cluster", num_prefill=num_prefill, num_decode=num_decode)
               .replace("router", grpc_port=-1 if config and config.router.grpc_port < 0 else 0, metrics_port=-1,
                        policy=policy, cost_profile=profile,
                        slo_ttft_ms=slo_ms[0], slo_tpot_ms=slo_ms[1]))   # CPU: 2 workers of ~1.5 GB in ~5 GB free
        self.policy = policy
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.cluster = ServingCluster(cfg, policy)
        t0 = time.monotonic()
        asyncio.run_coroutine_threadsafe(self.cluster.start(), self.loop).result(900)
        self.startup_s = time.monotonic() - t0
        self.client = None
        if self.cluster.grpc_port:
            from splitserve.client import Client
            self.client = Client(f"127.0.0.1:{self.cluster.grpc_port}")
        self.vocab = self.cluster.router.tokenizer.vocab_size

    def generate(self, token_ids: list[int], max_tokens: int, slo: dict | None = None) -> dict:
        """One greedy request (ignore_eos) to completion: {"status": "OK" | a grpc status name,
        "detail", "timing" (the Complete message's, in ms), "tokens", "remote", "cached"}. Over
        gRPC, or straight into the router when the cluster runs without a gRPC server. `slo`:
        the request's own {"ttft_ms", "tpot_ms"} targets (for the slo_aware policy)."""
        if self.client is None:
            return asyncio.run_coroutine_threadsafe(self._generate_inproc(token_ids, max_tokens, slo),
                                                    self.loop).result()
        import grpc
        from splitserve.client import make_request
        req = make_request(token_ids=token_ids, max_tokens=max_tokens, ignore_eos=True)
        if slo:
            req.slo.ttft_ms, req.slo.tpot_ms = slo["ttft_ms"], slo["tpot_ms"]
        try:
            res = self.client.generate(req)
        except grpc.RpcError as e:
            return {"status": e.code().name, "detail": (e.details() or "")[:200]}
        return {"status": "OK", "timing": res.timing, "tokens": len(res.token_ids),
                "remote": bool(res.info.get("remote_prefill")), "cached": int(res.usage.get("cached_prompt_tokens", 0))}

    async def _generate_inproc(self, token_ids: list[int], max_tokens: int, slo: dict | None = None) -> dict:
        from splitserve.router.router import RequestError
        router = self.cluster.router
        try:
            flight = router.admit(None, list(token_ids), None, {"max_tokens": max_tokens, "ignore_eos": True},
                                  slo=slo)
        except RequestError as e:
            return {"status": e.code, "detail": str(e)[:200]}
        async for ev in router.generate(flight):
            if ev.kind == "error":
                return {"status": ev.info["code"], "detail": ev.info["message"][:200]}
            if ev.kind == "complete":
                i = ev.info
                return {"status": "OK", "timing": i["timing"], "tokens": len(i["token_ids"]),
                        "remote": bool(i["remote_prefill"]), "cached": int(i["usage"]["cached_prompt_tokens"])}
        return {"status": "INTERNAL", "detail": "the router's stream ended without a completion"}

    def warm_up(self) -> None:
        for n in (600, 300, 40):   # long ones (remote) and a short one: warm P, D, transfer
            ids = wl.synthesize_prompt((987654321 + n,), n, self.vocab, seed=12345)
            r = self.generate(ids, 4)
            if r["status"] not in ("OK", "RESOURCE_EXHAUSTED"):   # slo_aware may refuse a long one
                raise RuntimeError(f"warm-up request failed: {r}")

    def stop(self) -> None:
        import ray
        asyncio.run_coroutine_threadsafe(self.cluster.stop(), self.loop).result(120)
        ray.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_requests(rc: RealCluster, reqs: list[wl.Request], token_seed: int, slo: dict | None = None) -> dict:
    """Send `reqs` at their arrival times (one thread each); per-request timings from Complete
    (`slo`: every request's own targets, {"ttft_ms", "tpot_ms"}).

    `token_seed` picks the synthesized token ids: a new seed per run keeps runs on one cluster
    from hitting each other's prefix caches (within a run, shared hash ids share tokens)."""
    prompts = [wl.synthesize_prompt(r.hash_ids, r.prompt_tokens, rc.vocab, seed=token_seed) for r in reqs]
    load0 = os.getloadavg()[0]

    def one(i: int) -> dict:
        r = reqs[i]
        time.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
        row = {"rid": r.rid, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
               "output_tokens": r.output_tokens, "session": r.session}
        res = rc.generate(prompts[i], r.output_tokens, slo)
        if res["status"] != "OK":
            return {**row, "status": res["status"], "detail": res["detail"]}
        t, n = res["timing"], res["tokens"]
        return {**row, "status": "OK", "ttft_s": t.get("ttft_ms", 0) / 1e3,
                "tpot_s": t.get("decode_ms", 0) / 1e3 / max(n - 1, 1), "tokens": n,
                "queue_s": t.get("queue_ms", 0) / 1e3, "prefill_s": t.get("prefill_ms", 0) / 1e3,
                "transfer_s": t.get("transfer_ms", 0) / 1e3, "e2e_s": t.get("e2e_ms", 0) / 1e3,
                "overlapped_s": t.get("overlapped_ms", 0) / 1e3,
                "reserve_s": t.get("reserve_ms", 0) / 1e3, "commit_s": t.get("commit_ms", 0) / 1e3,
                "remote": res["remote"], "cached_tokens": res["cached"]}
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(reqs)) as ex:
        rows = list(ex.map(one, range(len(reqs))))
    return {"wall_s": time.monotonic() - t0, "loadavg_start": round(load0, 2),
            "loadavg_end": round(os.getloadavg()[0], 2), "rows": rows}


def summarize(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "OK"]
    out = {"requests": len(rows), "served": len(ok)}
    for k in ("ttft_s", "tpot_s"):
        for q in (50, 90):
            out[f"{k[:-2]}_p{q}"] = round(pct([r[k] for r in ok], q), 4)
    return out


# ---------------------------------------------------------------------- the simulator side
def simulate(reqs: list[wl.Request], policy: str, num_prefill: int, num_decode: int, cost, slo=None,
             chunk_tokens: int | None = None, engine_lock: bool = True, transfer=None, solo=None,
             push_waits: bool = False):
    from bench.sim.cluster import ClusterSpec, Simulator
    from bench.simulator import make_policy
    from splitserve.router.slo_policy import SLO
    slo = slo or SLO(2.0, 0.1)
    chunk = chunk_tokens or cost.prefill_chunk_tokens   # the engine's max_num_batched_tokens
    cost = replace(cost, kv_capacity_tokens=int(KV_GIB * 2**30) // cost.kv_bytes_per_token // 16 * 16)
    if transfer is not None:      # TransferCoeffs fitted from the real cluster's transfer timings
        cost = replace(cost, transfer=transfer)
    spec = ClusterSpec(0 if policy == "colocated" else num_prefill, num_decode, chunk, None, max_new_tokens=None,
                       engine_lock=engine_lock, push_waits_forward=push_waits, solo_cost=solo and replace(solo, kv_capacity_tokens=cost.kv_capacity_tokens))
    return Simulator(spec, cost, make_policy(policy, cost, slo, chunk)).run(reqs)


def sim_summary(res) -> dict:
    served = [r for r in res.requests if not r.rejected]
    return {"requests": len(res.requests), "served": len(served),
            **{f"{k}_p{q}": round(pct([getattr(r, k + '_s') for r in served], q), 4)
               for k in ("ttft", "tpot") for q in (50, 90)}}


def compare(measured: dict, predicted: dict) -> dict:
    return {k: {"measured": measured[k], "predicted": predicted[k],
                "error": round((predicted[k] - measured[k]) / measured[k], 3) if measured[k] else None}
            for k in ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")}


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def median_summary(runs: list[dict]) -> dict:
    keys = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90")
    return {k: round(statistics.median(r["measured"][k] for r in runs), 4) for k in keys}


def report(res: dict, out: Path) -> None:
    stem = out / f"validate-sim-{res['date']}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Simulator vs the real local cluster ({res['date']}, commit `{res['commit']}`)", "",
             f"- Real runs: `{res['command']}` (commit `{res['commit']}`); simulated by `{res.get('sim_command', '')}` "
             f"(commit `{res.get('sim_commit', res['commit'])}`)",
             f"- Machine: {res['machine']}",
             f"- Cluster: {res['shape']}, policy `{res['policy']}`; profile `{res['profile']}` "
             f"({res['profile_note']})",
             f"- Measured = median over {res['repeats']} real runs of each run's p50/p90 (nearest rank) of the "
             "router's Complete timing (TTFT = admit -> first token at the router; TPOT = decode time / "
             "(tokens - 1)); predicted = the simulator on the same requests.",
             "- Contention: other sessions' tests (Ray clusters, pytest) ran on the same 2 cores; load averages "
             "per run are in the JSON.", ""]
    for variant, rows in res["tables"].items():
        lines += [f"## {variant}", "", "| workload | metric | measured | predicted | error |", "|---|---|---:|---:|---:|"]
        for wname, cmp in rows.items():
            for k, v in cmp.items():
                err = f"{v['error'] * 100:+.0f}%" if v["error"] is not None else "n/a"
                unit = 1e3
                lines.append(f"| {wname} | {k} (ms) | {v['measured'] * unit:.0f} | {v['predicted'] * unit:.0f} | {err} |")
        lines.append("")
    lines += ["Real runs (p50/p90 TTFT s, p50/p90 TPOT ms, load average start-end):", ""]
    for w, runs in res["real"].items():
        for i, run in enumerate(runs):
            m = run["measured"]
            lines.append(f"- {w} run {i}: TTFT {m['ttft_p50']:.2f}/{m['ttft_p90']:.2f}, TPOT {m['tpot_p50'] * 1e3:.0f}/"
                         f"{m['tpot_p90'] * 1e3:.0f}, load {run['loadavg_start']}-{run['loadavg_end']}, "
                         f"{len(run['rows'])} requests, wall {run['wall_s']:.0f} s")
    tf = res.get("transfer_fit")
    if tf:
        lines += ["", f"Transfer fitted on {tf['from']}'s real remote prefills (samples over 3x the median dropped: "
                  f"those waited for P's engine lock): {tf['latency_s'] * 1e3:.0f} ms + bytes / "
                  f"{tf['bandwidth_Bps'] / 1e9:.2f} GB/s.", ""]
    lines += res.get("notes", [])
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="round_robin")
    ap.add_argument("--prefill", type=int, default=1)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", default="short_chat,long_multi_turn")
    ap.add_argument("--profile", default="cpu-smollm2-shared", help="speed with both workers busy")
    ap.add_argument("--solo-profile", default="cpu-smollm2", help="speed with the other worker idle")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--resim", default="", help="re-simulate the real runs saved in this JSON (no cluster)")
    ap.add_argument("--append", default="", help="add this invocation's real runs to the runs saved in this JSON")
    a = ap.parse_args()
    from splitserve.router.cost_model import load_profile
    cost, solo = load_profile(a.profile), load_profile(a.solo_profile)
    names = a.workloads.split(",")
    if a.resim:
        res = json.loads(Path(a.resim).read_text())
    else:
        res = {"date": date.today().isoformat(), "commit": git_commit(), "command": "python " + " ".join(sys.argv),
               "machine": "2-core shared CPU VM, SmolLM2-135M fp32, 1 torch thread per worker actor",
               "policy": a.policy, "shape": f"{a.prefill}P+{a.decode}D", "repeats": a.repeats, "real": {}}
        if a.append:
            old = json.loads(Path(a.append).read_text())
            res["real"] = old["real"]
            res["command"] = old["command"] + " ; then " + res["command"]
        first = min((len(v) for v in res["real"].values()), default=0)
        rc = RealCluster(a.policy, a.prefill, a.decode, profile=a.profile)
        res["startup_s"] = round(rc.startup_s, 1)
        try:
            rc.warm_up()
            for rep in range(a.repeats):       # interleave the workloads: contention hits both alike
                for w in names:
                    run = run_requests(rc, WORKLOADS[w](), token_seed=1000 * (rep + first) + len(w))
                    run["measured"] = summarize(run["rows"])
                    res["real"].setdefault(w, []).append(run)
                    print(w, rep, run["measured"], f"load {run['loadavg_start']}->{run['loadavg_end']}", flush=True)
                    Path("/tmp/validate-sim-partial.json").write_text(json.dumps(res))
        finally:
            rc.stop()
    res["sim_commit"], res["sim_command"] = git_commit(), "python " + " ".join(sys.argv)
    res["profile"] = a.profile
    res["profile_note"] = cost.source.get("command", "") + f", fitted {cost.source.get('date', '?')}"
    res["repeats"] = min(len(v) for v in res["real"].values())
    res["tables"] = {}
    pol, p, d = res["policy"], *map(int, res["shape"].replace("D", "").split("P+"))
    tr = fit_transfer([r for run in res["real"][names[0]] for r in run["rows"]], cost.kv_bytes_per_token)
    res["transfer_fit"] = {"from": names[0], "latency_s": round(tr.latency_s, 4), "bandwidth_Bps": round(tr.bandwidth_Bps)}
    variants = {
        f"A: simulator as it was, {a.solo_profile} (solo speed), no engine lock, assumed 2 ms + 1 GB/s transfer":
            dict(engine_lock=False, cost=solo),
        f"B: A with {a.profile} (speed with both workers busy)": dict(engine_lock=False),
        "C: B + engine-loop lock (remote start/commit wait for D's step in progress)": dict(engine_lock=True),
        f"D: C + transfer fitted on {names[0]}'s real transfers": dict(engine_lock=True, transfer=tr),
        f"E: D + CPU sharing (a step runs at {a.solo_profile} speed when the other worker is idle, else "
        f"{a.profile})": dict(engine_lock=True, transfer=tr, solo=solo),
        "F: E + P's push always waits for P's next forward (the lock race always lost)":
            dict(engine_lock=True, transfer=tr, solo=solo, push_waits=True)}
    for label, kw in variants.items():
        kw = {"cost": cost, **kw}
        res["tables"][label] = {w: compare(median_summary(res["real"][w]),
                                           sim_summary(simulate(WORKLOADS[w](), pol, p, d, **kw))) for w in names}
    report(res, Path(a.out))


def fit_transfer(rows: list[dict], kv_bytes_per_token: int):
    """latency + bytes / bandwidth from the real remote prefills' transfer timings (D's missing tokens)."""
    from splitserve.router.cost_model import TransferSample, fit
    samples = [TransferSample((r["prompt_tokens"] - r["cached_tokens"]) * kv_bytes_per_token, r["transfer_s"])
               for r in rows if r["status"] == "OK" and r.get("remote") and r["transfer_s"] > 0]
    # transfer_s includes P's wait for its engine lock (the next forward), which the simulator models
    # on its own (engine_lock): drop the samples over 3x the median before fitting the wire itself
    med = statistics.median(s.seconds for s in samples)
    return fit([s for s in samples if s.seconds <= 3 * med]).transfer


if __name__ == "__main__":
    main()
