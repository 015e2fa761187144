"""Disaggregated vs colocated serving across GPUs: the real Ray cluster, one worker per GPU.

On G GPUs it runs, one cluster after another, the shapes named by --shapes: "xPyD" (x prefill +
y decode workers, x + y = G, policy --disagg-policy) and "GD" colocated (G decode workers that
prefill locally, policy colocated). Each shape serves every workload of --workloads at every
rate of its --rates list (bench/workloads.py; seeded, prompts synthesized from hash ids so the
prefix sharing of multi-turn sessions is real); every request's TTFT/TPOT comes from the router's
Complete message. Per point: TTFT/TPOT p50/p90/p99, SLO attainment at the stated SLO, and for the
remote prefills the layer-wise push overlap (the exposed transfer after the prefill's forward vs
the completing prefill step it ran under). Goodput per shape and workload = the highest rate with
>= 90% of requests meeting both targets (interpolated). Each worker's UCX transports and GPU are
recorded. Writes <out>/cluster-gpu[-tag].json/.md after every point (a cut-off run keeps its data).

    python bench/cluster_gpu.py --shapes 1P1D,2D --workloads chat,long --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import workloads as wl  # noqa: E402
from bench.goodput_real import goodput  # noqa: E402
from bench.validate_sim import RealCluster, git_commit, pct, run_requests  # noqa: E402

# name -> (make(n, rate, seed) -> requests, SLO (ttft_s, tpot_s), default rates req/s, requests per point)
# (SLOs stated before the first GPU run; rows are kept, so other SLOs can be read off later)
WORKLOADS = {
    "chat": (lambda n, r, s: wl.synthetic(n, r, s, prompt_median=1024, output_median=128),
             (1.0, 0.03), "4,8,16,24,32", 100),
    "long": (lambda n, r, s: wl.long_context(n, r, s, lo=4096, hi=16384, output_median=128),
             (3.0, 0.03), "1.5,3,4.5", 40),
    "multi_turn": (lambda n, r, s: wl.multi_turn(max(n // 4, 1), 4, r / 4, s, system_tokens=2048,
                                                 output_median=128, think_s=2.0),
                   (1.0, 0.03), "4,8,16", 100),
}
MAX_OUTPUT = 512          # output lengths are clipped here so a point ends in seconds


def point_requests(wname: str, rate: float, n: int, seed: int, max_model_len: int) -> list[wl.Request]:
    """The requests of one point (deterministic: bench/validate_sim_gpu.py rebuilds them)."""
    reqs = [r if r.output_tokens <= MAX_OUTPUT else replace(r, output_tokens=MAX_OUTPUT)
            for r in WORKLOADS[wname][0](n, rate, seed)]
    return [r if r.prompt_tokens + r.output_tokens < max_model_len else
            replace(r, prompt_tokens=max_model_len - r.output_tokens - 16) for r in reqs]


def parse_shape(s: str) -> tuple[int, int, str]:
    m = re.fullmatch(r"(\d+)P(\d+)D", s)
    if m:
        p, d = int(m[1]), int(m[2])
        return p, d, "disagg"
    m = re.fullmatch(r"(\d+)D", s)
    if m:
        return 0, int(m[1]), "colocated"
    raise SystemExit(f"--shapes: {s!r} is not xPyD or yD")


def make_config(a, p: int, d: int):
    from splitserve.config import Config
    gpu = a.device == "cuda"       # cpu: a smoke run of this script on a tiny model
    return (Config().replace("model", model=a.model, dtype="bfloat16" if gpu else "float32", device=a.device)
            .replace("scheduler", max_model_len=a.max_model_len, max_num_seqs=a.max_seqs,
                     max_num_batched_tokens=a.chunk)
            .replace("cache", memory_fraction=a.memory_fraction, kv_dtype=a.kv_dtype, cpu_cache_gib=0.25)
            .replace("transfer", self_test=True, self_test_mib=256 if gpu else 16, lease_timeout_s=120.0)
            .replace("router", local_prefill_max_tokens=a.local_prefill_max, request_timeout_s=300.0,
                     overlap_reserve=a.overlap_reserve == "on",
                     grpc_port=0 if a.frontend == "grpc" else -1)
            .replace("cluster", num_prefill=p, num_decode=d, gpus_per_worker=a.gpus_per_worker if gpu else 0,
                     cpus_per_worker=4 if gpu else 1))


def point_summary(rows: list[dict], slo: tuple[float, float], layers: int) -> dict:
    ok = [r for r in rows if r["status"] == "OK"]
    out = {"requests": len(rows), "served": len(ok),
           "attainment": round(sum(r["ttft_s"] <= slo[0] and r["tpot_s"] <= slo[1] for r in ok) / max(len(rows), 1), 3)}
    for k in ("ttft_s", "tpot_s"):
        for q in (50, 90, 99):
            out[f"{k[:-2]}_p{q}"] = round(pct([r[k] for r in ok], q), 4)
    remote = [r for r in ok if r.get("remote")]
    out["remote"] = len(remote)
    if remote:
        exposed = [r["transfer_s"] for r in remote]
        step = [r["overlapped_s"] for r in remote]
        layer_s = [s / layers for s in step if s > 0]
        out.update(transfer_exposed_p50_ms=round(pct(exposed, 50) * 1e3, 2),
                   transfer_exposed_p90_ms=round(pct(exposed, 90) * 1e3, 2),
                   prefill_step_p50_ms=round(pct(step, 50) * 1e3, 2),
                   exposed_layers_p50=round(pct([e / ls for e, ls in zip(exposed, layer_s)], 50), 2) if layer_s else None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default="1P1D,2D")
    ap.add_argument("--workloads", default="chat,long")
    ap.add_argument("--rates", default="", help="per workload, e.g. 'chat=4,8;long=1,2' (default: built in)")
    ap.add_argument("--requests", type=int, default=0, help="requests per point (0: the workload's own)")
    ap.add_argument("--disagg-policy", default="load_aware", help="load_aware, slo_aware, round_robin")
    ap.add_argument("--profile", default="", help="the router's cost profile (default: h200-llama3-8b-profiled "
                    "on cuda, cpu-smollm2 on cpu); slo_aware predicts TTFT/TPOT with it")
    ap.add_argument("--kv-dtype", default="auto")
    ap.add_argument("--gpus-per-worker", type=float, default=1.0, help="0.5: two workers share a GPU")
    ap.add_argument("--memory-fraction", type=float, default=0.85, help="of free GPU memory, for each worker's KV")
    ap.add_argument("--chunk", type=int, default=2048, help="scheduler token budget per step (both shapes)")
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=32768)
    ap.add_argument("--local-prefill-max", type=int, default=64)
    ap.add_argument("--overlap-reserve", default="on", choices=["on", "off"],
                    help="router.overlap_reserve: remote prefills start while D reserves (off: after)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--deadline-s", type=float, default=0, help="skip points that would start after this many s")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--frontend", default="auto", choices=["auto", "grpc", "inproc"],
                    help="requests over the gRPC API, or straight into the router (auto: gRPC if its stubs build here)")
    a = ap.parse_args()
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a.profile = a.profile or ("h200-llama3-8b-profiled" if a.device == "cuda" else "cpu-smollm2")
    if a.frontend == "auto":
        a.frontend = "grpc" if _grpc_ok() else "inproc"
    t_start = time.monotonic()
    rates = {k: v[2] for k, v in WORKLOADS.items()}
    for part in filter(None, a.rates.split(";")):
        k, v = part.split("=")
        rates[k] = v
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / ("cluster-gpu" + (f"-{a.tag}" if a.tag else ""))
    res = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": os.environ.get("GIT_COMMIT") or git_commit(),
           "command": "python bench/cluster_gpu.py " + " ".join(sys.argv[1:]), "model": a.model,
           "frontend": a.frontend, "config": {"seed": a.seed, "max_model_len": a.max_model_len, "requests": a.requests,
                      "memory_fraction": a.memory_fraction, "gpus_per_worker": a.gpus_per_worker, "chunk": a.chunk, "max_seqs": a.max_seqs, "kv_dtype": a.kv_dtype,
                      "local_prefill_max": a.local_prefill_max, "disagg_policy": a.disagg_policy,
                      "profile": a.profile, "overlap_reserve": make_config(a, 1, 1).router.overlap_reserve},
           "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_NVLS", "TORCH_SYMM", "NVSHMEM_DISABLE", "UCX_TLS"))},
           "workloads": {w: {"slo": {"ttft_s": WORKLOADS[w][1][0], "tpot_s": WORKLOADS[w][1][1]}} for w in a.workloads.split(",")},
           "shapes": {}}
    from splitserve.engine.arch import dummy_arch
    layers = dummy_arch(a.model.split(":", 1)[1]).num_layers if a.model.startswith("dummy:") else 32
    for shape in a.shapes.split(","):
        p, d, kind = parse_shape(shape)
        policy = a.disagg_policy if kind == "disagg" else "colocated"
        t0 = time.monotonic()
        rc = RealCluster(policy, p, d, config=make_config(a, p, d), profile=a.profile)
        sres = res["shapes"][shape] = {"policy": policy, "prefill": p, "decode": d, "startup_s": round(time.monotonic() - t0, 1),
                                       "workers": {}, "workloads": {}}
        try:
            rc.warm_up()
            _warm_long(rc, a.max_model_len)
            for name, actor in rc.cluster.actors.items():
                import ray
                sres["workers"][name] = ray.get(actor.transfer_info.remote(), timeout=60)
            print(shape, "workers:", json.dumps(sres["workers"]), flush=True)
            for wname in a.workloads.split(","):
                make, slo, _, n_req = WORKLOADS[wname]
                pts = sres["workloads"].setdefault(wname, {"points": []})["points"]
                for i, rate in enumerate(float(x) for x in rates[wname].split(",")):
                    if a.deadline_s and time.monotonic() - t_start > a.deadline_s:
                        print(f"deadline: skipping {shape} {wname} {rate}", flush=True)
                        continue
                    reqs = point_requests(wname, rate, a.requests or n_req, a.seed, a.max_model_len)
                    run = run_requests(rc, reqs, token_seed=1000 * list(WORKLOADS).index(wname) + i,
                                       slo={"ttft_ms": slo[0] * 1e3, "tpot_ms": slo[1] * 1e3})
                    pt = {"rate": round(wl.offered_rate(reqs), 3), "nominal_rate": rate, "wall_s": round(run["wall_s"], 1),
                          **point_summary(run["rows"], slo, layers), "rows": run["rows"]}
                    pts.append(pt)
                    print(shape, wname, {k: v for k, v in pt.items() if k != "rows"}, flush=True)
                    sres["workloads"][wname]["goodput"] = goodput(pts)
                    write(res, stem)
        finally:
            rc.stop()
        write(res, stem)
    print(f"done in {time.monotonic() - t_start:.0f}s", flush=True)


def _grpc_ok() -> bool:
    try:
        from splitserve.proto import load
        load()
        import grpc_health  # noqa: F401
        return True
    except Exception as e:      # e.g. a device image without grpcio-tools: note it and go in-process
        print(f"gRPC frontend unavailable ({e!r}); requests go straight into the router", flush=True)
        return False


def _warm_long(rc: RealCluster, max_len: int) -> None:
    """Compile the kernels' long-prompt variants and fill the decode graphs before timing (with
    targets loose enough that an SLO-aware router admits them)."""
    from concurrent.futures import ThreadPoolExecutor
    loose = {"ttft_ms": 600e3, "tpot_ms": 10e3}
    ids = [wl.synthesize_prompt((7_000_000 + n,), n, rc.vocab, seed=4242) for n in (1500, 5000, 12000) if n < max_len - 8]
    for x in ids:
        r = rc.generate(x, 4, loose)
        if r["status"] != "OK":
            raise RuntimeError(f"warm-up request failed: {r}")
    with ThreadPoolExecutor(48) as ex:
        list(ex.map(lambda i: rc.generate(ids[0][:200 + i], 16, loose), range(48)))


def write(res: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"# Disaggregated vs colocated across GPUs ({res['date']}, commit `{res['commit']}`)", "",
             f"- Command: `{res['command']}`", f"- Requests enter via: {res['frontend']}", f"- Model: {res['model']} (random weights at the real shape), "
             f"config {res['config']}", f"- Env: {res['env']}", ""]
    for shape, s in res["shapes"].items():
        lines.append(f"## {shape} ({s['policy']}), start-up {s['startup_s']} s")
        for name, w in s["workers"].items():
            lines.append(f"- {name}: {w.get('gpu')} {w.get('gpu_uuid') or w.get('pci_bus_id')} (CUDA_VISIBLE_DEVICES={w.get('cuda_visible_devices')}), "
                         f"self-test {w.get('self_test')}, peers {w.get('peers')}")
        lines.append("")
    lines += ["| workload | SLO TTFT/TPOT | shape | rate | attain | TTFT p50/p90/p99 (s) | TPOT p50/p90/p99 (ms) | "
              "remote | exposed xfer p50/p90 (ms) | prefill step p50 (ms) | exposed layers p50 |",
              "|---|---|---|---:|---:|---|---|---:|---|---:|---:|"]
    for wname, meta in res["workloads"].items():
        slo = meta["slo"]
        for shape, s in res["shapes"].items():
            for p in s["workloads"].get(wname, {}).get("points", []):
                lines.append(
                    f"| {wname} | {slo['ttft_s']} s / {slo['tpot_s'] * 1e3:.0f} ms | {shape} | {p['rate']:.2f} | {p['attainment']:.2f} | "
                    f"{p['ttft_p50']:.3f} / {p['ttft_p90']:.3f} / {p['ttft_p99']:.3f} | "
                    f"{p['tpot_p50'] * 1e3:.1f} / {p['tpot_p90'] * 1e3:.1f} / {p['tpot_p99'] * 1e3:.1f} | {p['remote']} | "
                    f"{p.get('transfer_exposed_p50_ms', '-')} / {p.get('transfer_exposed_p90_ms', '-')} | "
                    f"{p.get('prefill_step_p50_ms', '-')} | {p.get('exposed_layers_p50', '-')} |")
    lines += ["", "| workload | shape | goodput (req/s, >= 90% meet both) |", "|---|---|---:|"]
    for wname in res["workloads"]:
        for shape, s in res["shapes"].items():
            if wname in s["workloads"]:
                w = s["workloads"][wname]
                pts = w.get("points", [])
                more = ">= " if pts and pts[-1]["attainment"] >= 0.9 else ""   # never saturated
                lines.append(f"| {wname} | {shape} | {more}{w.get('goodput', 0):.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
