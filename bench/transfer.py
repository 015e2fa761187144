"""KV transfer benchmark: paged, layer-wise kvtransfer vs a raw ucxx send of one contiguous buffer
of the same size, measured side by side in the same run, between two processes.

    python bench/transfer.py --device cpu            # CPU loopback (UCX over TCP)
    python bench/transfer.py --device cuda           # two processes sharing one GPU (cuda_ipc)
    python bench/transfer.py --device cuda --gpus 0,1 --sizes 8,32,128,512
                                                     # prefill on GPU 0, decode on GPU 1 (+ a torch
                                                     # device-to-device copy between them, same sizes)

Block = Llama-3-8B paged KV: 32 layers x K/V x 16 tokens x 8 kv heads x 128 dims x bf16 = 2 MiB.
For each size (1, 16, 256, 4096 blocks) and destination pattern (contiguous: one run; scattered:
a random permutation, everything staged) it times open -> verified Success (handshake, per-layer
sends, checksums on both sides, completion) and the raw send -> receiver ack. Then a layer-wise
run overlaps the transfer with a prefill-shaped matmul per layer and reports the exposed transfer
time after the last layer. Writes bench/results/transfer-<device>.json/.md (or --out DIR).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if not (ROOT / "splitserve.egg-info").exists() or "splitserve" not in sys.modules:
    # not pip-installed (the device): map the package folders by hand
    try:
        import splitserve.kvtransfer  # noqa: F401
    except ImportError:
        import types
        pkg = types.ModuleType("splitserve")
        pkg.__path__ = [str(ROOT / "splitserve")]
        sys.modules["splitserve"] = pkg
        sub = types.ModuleType("splitserve.kvtransfer")
        sub.__path__ = [str(ROOT / "kvtransfer")]
        sys.modules["splitserve.kvtransfer"] = sub

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")

LLAMA3_8B = dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128, dtype="bfloat16")
MIB = 1 << 20


def commit() -> str:
    if os.environ.get("GIT_COMMIT"):     # the device's copy of the tree may carry a stale .git
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("GIT_COMMIT", "unknown")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default="1,16,256,4096")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (4096 blocks: 1 on cpu)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--overlap-blocks", type=int, default=256)
    ap.add_argument("--overlap-layers", default="matmul2,llama",
                    help="prefill-shaped layers to overlap with (kvtransfer/testing.py overlapped_send)")
    ap.add_argument("--overlap-reps", type=int, default=3)
    ap.add_argument("--overlap-pattern", default="scattered", choices=["scattered", "contiguous"])
    ap.add_argument("--tag", default="", help="results file suffix: transfer-<device>-<tag>")
    ap.add_argument("--gpus", default="", help="P,D: the GPU of the prefill (sender) and decode process")
    ap.add_argument("--visible", default="all", choices=["all", "own"],
                    help="with --gpus: each process sees both GPUs (its own first) or only its own")
    ap.add_argument("--direct-min-blocks", type=int, default=0, help="0: the config default")
    ap.add_argument("--bundle-kib", type=int, default=0, help="0: the config default")
    ap.add_argument("--max-bundles", type=int, default=-1, help="-1: the config default (0: bundles never grow)")
    ap.add_argument("--progress-mode", default="", choices=["", "thread", "thread-polling"])
    ap.add_argument("--data-path", default="", choices=["", "tag", "rma", "auto"],
                    help="transfer.data_path of both agents (empty: the config default)")
    ap.add_argument("--rma-min-kib", type=int, default=0, help="transfer.rma_min_kib (0: the config default)")
    ap.add_argument("--staged-path", default="", choices=["", "auto", "buffer", "iov"],
                    help="transfer.staged_path of both agents (empty: the config default)")
    ap.add_argument("--prepost", default="", help="comma list of on|off: receives posted at reservation or "
                    "on `begin` (transfer.prepost); several = an interleaved A/B in the same run (empty: "
                    "the config default)")
    ap.add_argument("--exec-ab", default="", help="'name:stmt|name:stmt': an interleaved A/B of module settings, "
                    "each statement run in both workers before its variant's transfers (e.g. 'nocap:import "
                    "splitserve.kvtransfer.sender_data as S; S.PREP_STEP_BYTES = 0|cap:...')")
    args = ap.parse_args()
    from splitserve.kvtransfer.testing import spawn_worker
    if args.prepost and args.exec_ab:
        raise SystemExit("--prepost with several values and --exec-ab: one A/B at a time")
    variants = [{"on": True, "off": False}[v] for v in args.prepost.split(",")] if args.prepost else [None]
    stmts = dict(v.split(":", 1) for v in args.exec_ab.split("|")) if args.exec_ab else {}
    if args.exec_ab:
        variants = list(stmts)

    sizes = [int(s) for s in args.sizes.split(",")]
    nb = max(sizes)
    layout = dict(LLAMA3_8B, num_blocks=nb)
    cfg = {"self_test": True, "lease_timeout_s": 600.0, "self_test_mib": 256 if args.device == "cuda" else 64,
           "staging_layers": 8 if args.device == "cuda" else 4}   # CPU: 2 x 8 GiB pools in 23 GiB
    cfg.update({k: v for k, v in (("direct_min_blocks", args.direct_min_blocks), ("bundle_kib", args.bundle_kib),
                                  ("data_path", args.data_path), ("progress_mode", args.progress_mode),
                                  ("rma_min_kib", args.rma_min_kib), ("staged_path", args.staged_path)) if v})
    if args.max_bundles >= 0:
        cfg["max_bundles"] = args.max_bundles
    t0 = time.time()
    gp, gd = (args.gpus.split(",") + [""])[:2] if args.gpus else ("", "")
    def env(own: str, other: str):
        return {"CUDA_VISIBLE_DEVICES": own + ("," + other if args.visible == "all" and other != own else "")} if own else None
    d = spawn_worker(layout, seed=1, config_kw=cfg, device=args.device, start_timeout=600, env=env(gd, gp))
    p = spawn_worker(layout, seed=2, config_kw=cfg, device=args.device, start_timeout=600, env=env(gp, gd))
    print(f"workers up in {time.time() - t0:.1f}s; self-test: {d.call('self_test')}", flush=True)
    d.call("raw_connect", p.address)
    rows, tag, paths = [], 0x5C00_0000_0000_0000, set()
    rnd = random.Random(0)
    for n in sizes:
        nbytes = n * 2 * MIB
        reps = 1 if (n >= 4096 and args.device == "cpu") else args.reps
        copy_s = torch_copy_s(nbytes, gp, gd, reps) if gp and gd and gp != gd else None
        cases = {"contiguous": (list(range(n)), list(range(n)))}
        cases["scattered"] = (rnd.sample(range(nb), n), rnd.sample(range(nb), n))
        times = {(c, v): [] for c in cases for v in variants}
        phases = {(c, v): {} for c in cases for v in variants}
        quiet = []           # raw sends back to back (warm): the fastest the raw path gets
        for _ in range(reps + 1):            # first is warm-up (registration, IPC handles)
            tag += 2
            d.call("raw_recv", nbytes, tag)
            quiet.append(p.call("raw_send", d.address, nbytes, tag, timeout=600))
        raw = []
        # then each rep: a raw send, then every pattern and variant, so the per-rep ratio compares
        # runs of the same moment (the 2-core CI/dev VM drifts by 30% between minutes); the
        # table's ratio is against the faster of the two raw medians (a raw send right after a
        # paged transfer is slower than back to back: H200 2-32 MiB 1.05-1.1 vs 0.57-0.65 ms)
        for r in range(reps + 1):
            tag += 2
            d.call("raw_recv", nbytes, tag)
            raw.append(p.call("raw_send", d.address, nbytes, tag, timeout=600))
            for pattern, (dst, src) in cases.items():
                for v in variants:   # interleaved: an A/B sees the same machine state
                    if args.exec_ab:
                        d.call("exec", stmts[v])
                        p.call("exec", stmts[v])
                    h = d.call("reserve", ids=dst, prepost=None if args.exec_ab else v)
                    res = p.call("timed_send", h, src, timeout=900)
                    if res["state"] != "success":
                        raise SystemExit(f"transfer failed: {res}")
                    paths.add(res["data_path"])
                    assert d.call("wait_lease", h["lease_id"], 60)[0] == "success"
                    if r > 0:
                        for k, x in phase_times(res, d.call("rx_trace", h["lease_id"])).items():
                            phases[pattern, v].setdefault(k, []).append(x)
                    if r == 0 and n <= 256:
                        assert d.call("digest", dst) == p.call("digest", src), "bytes differ"
                    d.call("release_completed", dst)
                    times[pattern, v].append(res["seconds"])
        raw_s = min(statistics.median(raw[1:]), statistics.median(quiet[1:]))
        for pattern in cases:
            for v in variants:
                t = statistics.median(times[pattern, v][1:])
                row = {"blocks": n, "pattern": pattern, "bytes": nbytes, "paged_s": t, "raw_s": raw_s,
                       "paged_gbps": nbytes / t / 1e9, "raw_gbps": nbytes / raw_s / 1e9,
                       "ratio": raw_s / t, "reps": reps, "copy_s": copy_s,
                       "copy_gbps": nbytes / copy_s / 1e9 if copy_s else None,
                       "prepost": None if args.exec_ab else v, "variant": v if args.exec_ab else None,
                       "paged_all_s": times[pattern, v][1:], "raw_all_s": raw[1:],
                       "raw_quiet_s": statistics.median(quiet[1:]), "raw_interleaved_s": statistics.median(raw[1:]),
                       "phases_ms": {k: round(statistics.median(x), 3) for k, x in phases[pattern, v].items()}}
                rows.append(row)
                pv = "" if v is None else (f" [{v}]" if args.exec_ab else f" prepost={'on' if v else 'off'}")
                print(f"{n:5d} blocks {pattern:10s}{pv} {nbytes / MIB:8.0f} MiB  paged {t * 1e3:9.2f} ms "
                      f"{row['paged_gbps']:8.2f} GB/s | raw {raw_s * 1e3:9.2f} ms "
                      f"{row['raw_gbps']:8.2f} GB/s | {row['ratio']:.2f}x"
                      + (f" | torch copy {row['copy_gbps']:8.2f} GB/s" if copy_s else ""), flush=True)
    # layer-wise streaming overlapped with a prefill-shaped workload, per layer kind (testing.py):
    # "matmul2" is runs v1-v13's proxy, "llama" a Llama-3-8B decoder layer with the push where the
    # engine makes it (after attention)
    n = min(args.overlap_blocks, nb)
    tokens = n * 16 if args.device == "cuda" else 64
    hidden, ffn = (4096, 14336) if args.device == "cuda" else (1024, 3584)
    heads = (32, 8, 128) if args.device == "cuda" else (8, 2, 128)
    overlaps = {}
    for kind in args.overlap_layers.split(","):
        runs = []
        for _ in range(args.overlap_reps):
            contiguous = args.overlap_pattern == "contiguous"
            h = d.call("reserve", ids=list(range(n)) if contiguous else rnd.sample(range(nb), n))
            ov = p.call("overlapped_send", h, list(range(n)) if contiguous else rnd.sample(range(nb), n),
                        tokens, hidden, ffn, timeout=900, layer_kind=kind, heads=heads)
            ov.update(blocks=n, tokens=tokens, hidden=hidden, ffn=ffn, pattern=args.overlap_pattern)
            if ov["state"] != "success":
                raise SystemExit(f"overlap ({kind}) transfer failed: {ov['reason']}; decode side: "
                                 f"{d.call('wait_lease', h['lease_id'], 5)}")
            rx = d.call("rx_trace", h["lease_id"])
            d.call("release_completed", h["block_ids"])
            ov["phases_ms"] = phase_times(ov, rx)
            # the whole merged timeline, ms from the end of the forward (both processes on one host)
            ov["timeline_ms"] = sorted([(round((t - ov["t0"]) * 1e3, 3), "P " + k) for k, t in ov.pop("trace")]
                                       + [(round((t - ov["t0"]) * 1e3, 3), "D " + k) for k, t in rx])
            runs.append(ov)
            print(f"overlap ({kind}): {n} blocks, layer {ov['layer_s'] * 1e3:.2f} ms, exposed after last layer "
                  f"{ov['exposed_s'] * 1e3:.2f} ms ({ov['exposed_s'] / ov['layer_s']:.2f} layers; decode "
                  f"verified at {ov['phases_ms'].get('D ack_send', float('nan')):.2f} ms); forward "
                  f"{ov['compute_only_s'] * 1e3:.1f} ms alone vs {ov['forward_with_transfer_s'] * 1e3:.1f} ms "
                  f"with transfer; {ov['state']}", flush=True)
        if not runs:                # --overlap-reps 0
            continue
        runs.sort(key=lambda r: r["exposed_s"])
        for r in runs[:len(runs) // 2] + runs[len(runs) // 2 + 1:]:
            r.pop("timeline_ms")   # the median run's timeline is kept (results stay small)
        overlaps[kind] = runs
    ov = overlaps.get(args.overlap_layers.split(",")[0]) or [None]   # --overlap-reps 0: none
    ov = ov[len(ov) // 2]   # the median run of the first kind: the phase table's row
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "device": args.device, "tag": args.tag, "self_test": d.call("self_test"), "rows": rows,
              "overlap": ov, "overlaps": overlaps, "layout": layout, "agent_config": cfg, "peer_transports": p.call("peer_transports"),
              "data_paths_used": sorted(paths), "exec_ab": stmts,
              "gpus": {"prefill": gp, "decode": gd, "visible": args.visible}, "topology": topology()}
    print("prefill->decode endpoint transports:", report["peer_transports"], flush=True)
    d.close()
    p.close()
    write(report, Path(args.out))


def pattern_name(row: dict) -> str:
    """The row's block pattern, and its prepost variant in an A/B run."""
    v = row.get("prepost")
    if row.get("variant"):
        return f"{row['pattern']} ({row['variant']})"
    return row["pattern"] + ("" if v is None else f" (prepost {'on' if v else 'off'})")


def torch_copy_s(nbytes: int, src_gpu: str, dst_gpu: str, reps: int) -> float:
    """Median time of one device-to-device torch copy of nbytes from src_gpu to dst_gpu (this
    process sees every GPU; peer access if the driver allows it)."""
    import torch
    a = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{src_gpu}")
    b = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_gpu}")
    times = []
    for _ in range(reps + 1):
        torch.cuda.synchronize(a.device)
        torch.cuda.synchronize(b.device)
        t = time.perf_counter()
        b.copy_(a, non_blocking=True)
        torch.cuda.synchronize(a.device)
        torch.cuda.synchronize(b.device)
        times.append(time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return statistics.median(times[1:])


def topology() -> dict:
    out = {}
    for name, cmd in (("nvidia_smi_topo", ["nvidia-smi", "topo", "-m"]),
                      ("nvlink", ["nvidia-smi", "nvlink", "--status"])):
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout[-3000:]
        except Exception as e:   # not an NVIDIA host
            out[name] = repr(e)
    try:
        import torch
        n = torch.cuda.device_count()
        out["peer_access"] = {f"{i}->{j}": torch.cuda.can_device_access_peer(i, j)
                              for i in range(n) for j in range(n) if i != j}
    except Exception as e:
        out["peer_access"] = repr(e)
    return out


PHASES = ("P begin_sent", "D begin_rx", "D posted", "P ready", "P prepped", "P put", "P posted", "P sent",
          "P sums", "P flushed", "D complete_rx", "D recvs_done", "D checksummed", "D ack_send", "P acked",
          "P sends_done")


def phase_times(res: dict, rx: list) -> dict:
    """ms from the transfer's start (t0: open; overlapped run: the last layer's push) to the
    last occurrence of each phase, on the sender (P) and receiver (D)."""
    out = {}
    ev = [("P " + k, t) for k, t in res.get("trace", [])] + [("D " + k, t) for k, t in rx]
    for k, t in ev:
        key = " ".join(k.split()[:2])
        if key in PHASES:
            out[key] = max(out.get(key, -1e9), (t - res["t0"]) * 1e3)
    return {k: round(out[k], 3) for k in PHASES if k in out}


def raw_pair(r: dict) -> str:
    """The two raw medians (the table's raw is the faster); '-' before they were both timed."""
    if "raw_quiet_s" not in r:
        return "-"
    return f"{r['raw_quiet_s'] * 1e3:.2f} / {r['raw_interleaved_s'] * 1e3:.2f}"


def per_rep_ratios(r: dict) -> str:
    """raw / paged of each rep (the rep's raw send, then its paged transfer): median (min-max);
    '-' for runs before the raw send was interleaved."""
    pairs = [a / b for a, b in zip(r.get("raw_all_s", []), r.get("paged_all_s", []))]
    if not pairs:
        return "-"
    return f"{statistics.median(pairs):.2f}x ({min(pairs):.2f}-{max(pairs):.2f})"


def write(rep: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (f"transfer-{rep['device']}" + (f"-{rep['tag']}" if rep.get("tag") else ""))
    stem.with_suffix(".json").write_text(json.dumps(rep, indent=1))
    lines = [f"# KV transfer, {rep['device']} ({rep['date']}, commit {rep['commit']})", "",
             f"Command: `python bench/{rep['command']}`  ",
             f"Agent config: {rep.get('agent_config', {})} (config defaults otherwise); data path used: "
             f"{rep.get('data_paths_used', ['tag'])}  ",
             f"Self-test: transports {rep['self_test'].get('transports')}, "
             f"{rep['self_test'].get('gbps', 0):.2f} GB/s loopback; prefill->decode endpoint "
             f"lanes: {rep.get('peer_transports')}", "",
             f"GPUs: {rep.get('gpus')}; peer access {rep.get('topology', {}).get('peer_access')}", "",
             "| blocks | pattern | MiB | paged ms | paged GB/s | raw ms | raw GB/s | paged/raw | "
             "raw back to back / interleaved ms | per-rep paged/raw, median (min-max) | torch copy GB/s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rep["rows"]:
        cp = f"{r['copy_gbps']:.2f}" if r.get("copy_gbps") else "-"
        lines.append(f"| {r['blocks']} | {pattern_name(r)} | {r['bytes'] / MIB:.0f} | "
                     f"{r['paged_s'] * 1e3:.2f} | {r['paged_gbps']:.2f} | {r['raw_s'] * 1e3:.2f} | "
                     f"{r['raw_gbps']:.2f} | {r['ratio']:.2f}x | {raw_pair(r)} | {per_rep_ratios(r)} | {cp} |")
    ov = rep["overlap"] or {}      # none with --overlap-reps 0
    if ov:
        lines += ["", f"Layer-wise overlap ({ov['blocks']} blocks {ov.get('pattern', 'scattered')}, "
                  f"{ov['tokens']} tokens, matmuls {ov['hidden']}x{ov['ffn']}): one layer "
                  f"{ov['layer_s'] * 1e3:.2f} ms, exposed transfer after the last layer "
                  f"{ov['exposed_s'] * 1e3:.2f} ms = {ov['exposed_s'] / ov['layer_s']:.2f} layers "
                  f"(target <= 1; the decode side had verified the KV at "
                  f"{ov.get('phases_ms', {}).get('D ack_send', float('nan')):.2f} ms); forward alone "
                  f"{ov['compute_only_s'] * 1e3:.1f} ms, with transfer "
                  f"{ov['forward_with_transfer_s'] * 1e3:.1f} ms."]
    for kind, runs in rep.get("overlaps", {}).items():
        lay = statistics.median(r["layer_s"] for r in runs)
        ex = [r["exposed_s"] for r in runs]
        ver = [r["phases_ms"].get("D ack_send", float("nan")) for r in runs]
        lines += [f"- overlap with `{kind}` layers ({lay * 1e3:.2f} ms each): exposed "
                  + ", ".join(f"{e * 1e3:.2f}" for e in ex)
                  + f" ms (median {statistics.median(ex) / lay:.2f} layers); decode side verified at "
                  + ", ".join(f"{v:.2f}" for v in ver) + " ms"]
    lines += ["", "Phases (median ms from open; P = prefill/sender, D = decode/receiver; last "
              "occurrence of each):", "",
              "| blocks | pattern | " + " | ".join(PHASES) + " |",
              "|---:|---|" + "---:|" * len(PHASES)]
    for r in rep["rows"]:
        ph = r.get("phases_ms", {})
        lines.append(f"| {r['blocks']} | {pattern_name(r)} | "
                     + " | ".join(f"{ph[k]:.2f}" if k in ph else "" for k in PHASES) + " |")
    if ov.get("phases_ms"):
        lines += ["", f"Overlap run ({ov.get('layer_kind', 'matmul2')}, median), ms from the forward's end: "
                  + ", ".join(f"{k} {v:.2f}" for k, v in ov["phases_ms"].items())]
    topo = rep.get("topology", {}).get("nvidia_smi_topo")
    if topo:
        lines += ["", "nvidia-smi topo -m:", "", "```", topo.rstrip(), "```"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
