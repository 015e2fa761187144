"""Cluster benchmark on the local Ray cluster: disaggregated (P prefill + D decode workers) vs
colocated (the same number of workers, all decoding and prefilling locally), one seeded workload.

Workload: Poisson arrivals at --rate req/s, prompts mixing short chat turns and long documents
(so some requests prefill remotely), --max-tokens greedy tokens each. Reports TTFT/TPOT/e2e
p50/p90/p99 and throughput per setup; JSON + markdown into --out.

    python bench/cluster.py [--requests 24] [--rate 1.0] [--workers 2] [--out bench/results]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import numpy as np

TOPICS = ["a lighthouse keeper", "a chess tournament", "the history of tea", "volcanoes", "a robot learning to paint",
          "the water cycle", "a city under the sea", "how bridges stand", "a desert caravan", "the first airplane"]


def workload(n: int, rate: float, seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        topic = rng.choice(TOPICS)
        if rng.random() < 0.5:
            prompt = f"Tell me one fact about {topic}."
        else:   # a long document to summarize: remote prefill territory
            body = " ".join(f"Paragraph {i} describes {rng.choice(TOPICS)} in some detail." for i in range(rng.randint(8, 24)))
            prompt = f"Summarize the following notes about {topic} in two sentences. {body}"
        out.append((t, prompt))
    return out


def pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def run_setup(name: str, num_prefill: int, num_decode: int, policy: str, load, max_tokens: int) -> dict:
    from splitserve.client import Client, make_request
    from splitserve.config import Config
    from splitserve.deploy.ray_cluster import ServingCluster
    cfg = (Config().replace("model", device="cpu").replace("cluster", num_prefill=num_prefill, num_decode=num_decode)
           .replace("router", grpc_port=0, metrics_port=-1, local_prefill_max_tokens=32))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    cluster = ServingCluster(cfg, policy)
    asyncio.run_coroutine_threadsafe(cluster.start(), loop).result(600)
    client = Client(f"127.0.0.1:{cluster.grpc_port}")
    client.generate(make_request("warm up", max_tokens=2))

    def one(item):
        at, prompt = item
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        r = client.generate(make_request(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                         ignore_eos=True))
        return r
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(load)) as ex:
        results = list(ex.map(one, load))
    wall = time.monotonic() - t0
    asyncio.run_coroutine_threadsafe(cluster.stop(), loop).result(120)
    import ray
    ray.shutdown()
    ttft = [r.timing["ttft_ms"] for r in results]
    tpot = [r.timing.get("decode_ms", 0) / max(len(r.token_ids) - 1, 1) for r in results]
    e2e = [r.timing["e2e_ms"] for r in results]
    return {"setup": name, "prefill_workers": num_prefill, "decode_workers": num_decode, "policy": policy,
            "requests": len(results), "remote_prefills": sum(r.info["remote_prefill"] for r in results),
            "throughput_tok_s": sum(len(r.token_ids) for r in results) / wall, "wall_s": wall,
            **{f"ttft_p{q}_ms": pct(ttft, q) for q in (50, 90, 99)},
            **{f"tpot_p{q}_ms": pct(tpot, q) for q in (50, 90, 99)},
            **{f"e2e_p{q}_ms": pct(e2e, q) for q in (50, 90, 99)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2, help="workers per setup (disaggregated: half prefill)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    load = workload(args.requests, args.rate, args.seed)
    p = args.workers // 2
    rows = [run_setup("disaggregated", p, args.workers - p, "load_aware", load, args.max_tokens),
            run_setup("colocated", 0, args.workers, "colocated", load, args.max_tokens)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"date": date.today().isoformat(), "commit": commit, "command": "python bench/cluster.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()), "machine": "2-core CPU VM, SmolLM2-135M fp32",
        "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"cluster-{res['date']}.json").write_text(json.dumps(res, indent=2))
    cols = ["setup", "remote_prefills", "throughput_tok_s", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p90_ms", "e2e_p50_ms", "e2e_p90_ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |" for r in rows]
    table = "\n".join(lines)
    (out / "cluster.md").write_text(f"# Cluster benchmark ({res['date']}, commit {commit})\n\n`{res['command']}`\n\n"
                                    f"{res['machine']}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
