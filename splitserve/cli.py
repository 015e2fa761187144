"""`splitserve` command line: generate (one process), and the cluster commands as they land."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .config import Config, load_config


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate from a model in this process (continuous batch)")
    p.add_argument("--model", default=None, help="smollm2 (default), a .gguf file, a safetensors dir, or dummy:SHAPE")
    p.add_argument("--config", default=None, help="YAML config file (see splitserve/config.py)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat the flag to run several prompts as one continuous batch")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=cmd_generate)


def _engine_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config) if args.config else Config()
    changes = {}
    if args.model:
        changes["model"] = args.model
    if args.device:
        changes["device"] = args.device
    return cfg.replace("model", **changes) if changes else cfg


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.engine import LLMEngine
    from .engine.request import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
    engine = LLMEngine.from_config(_engine_config(args))
    ids = []
    for i, prompt in enumerate(args.prompt):
        if args.chat:
            ids.append(engine.add_request(params=params, messages=[{"role": "user", "content": prompt}],
                                          request_id=str(i)))
        else:
            ids.append(engine.add_request(prompt, params, request_id=str(i)))
    final = {}
    stream = not args.json and len(ids) == 1
    while engine.has_unfinished():
        for out in engine.step():
            if stream:
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            if out.finished:
                final[out.request_id] = out
    if args.json:
        objs = [{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids, "text": o.text,
                 "finish_reason": o.finish_reason, "num_cached_tokens": o.num_cached_tokens,
                 "timings": o.timings} for o in (final[i] for i in ids)]
        print(json.dumps(objs[0] if len(objs) == 1 else {"outputs": objs}))
    elif stream:
        print()
    else:
        for i in ids:
            print(f"--- [{i}] {final[i].finish_reason}\n{final[i].text}")
    return 0


def _add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config file (see splitserve/config.py)")
    p.add_argument("--model", default=None, help="smollm2 (default), a .gguf file, a safetensors dir, or dummy:SHAPE")
    p.add_argument("--prefill", type=int, default=None, help="prefill workers (default 1)")
    p.add_argument("--decode", type=int, default=None, help="decode workers (default 1)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local cluster)")
    p.add_argument("--port", type=int, default=None, help="gRPC port (default 50051)")
    p.add_argument("--policy", default=None, choices=["load_aware", "slo_aware", "round_robin", "colocated"],
                   help="placement policy (default: router.policy of the config, load_aware)")


def _cluster_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config) if args.config else Config()
    if args.model:
        cfg = cfg.replace("model", model=args.model)
    changes = {k: v for k, v in (("num_prefill", args.prefill), ("num_decode", args.decode),
                                 ("ray_address", args.address)) if v is not None}
    if changes:
        cfg = cfg.replace("cluster", **changes)
    if args.port is not None:
        cfg = cfg.replace("router", grpc_port=args.port)
    return cfg


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    from .deploy.ray_cluster import ServingCluster

    from .logs import setup_logging
    setup_logging("router")

    async def serve() -> None:
        cluster = ServingCluster(_cluster_config(args), args.policy)
        await cluster.start()
        print(f"splitserve: serving on {cluster.config.router.host}:{cluster.grpc_port} "
              f"(metrics :{cluster.metrics.port}); Ctrl-C stops", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await cluster.stop()
    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from .client import Client, make_request
    client = Client(args.address)
    kw = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    req = (make_request(messages=[{"role": "user", "content": args.prompt}], **kw) if args.chat
           else make_request(args.prompt, **kw))
    on_chunk = None if args.json else (lambda ids, text: (sys.stdout.write(text), sys.stdout.flush()))
    res = client.generate(req, on_chunk=on_chunk)
    if args.json:
        print(json.dumps({"request_id": res.request_id, "token_ids": res.token_ids, "text": res.text,
                          "finish_reason": res.finish_reason, "usage": res.usage, "timing": res.timing,
                          **{k: v for k, v in res.info.items() if not k.startswith("complete_")}}))
    else:
        print()
        print(_timing_line(res))
    return 0


def _timing_line(res) -> str:
    t = res.timing
    where = (f"prefill {res.info['prefill_worker']} -> decode {res.info['decode_worker']}"
             if res.info.get("remote_prefill") else f"local prefill on {res.info.get('decode_worker')}")
    transfer = "transfer -"   # a local prefill moves no KV
    if res.info.get("remote_prefill"):
        # the KV is pushed layer by layer during the prefill step; what the request waits for is
        # the part left after the forward
        transfer = f"transfer {t.get('transfer_ms', 0):.2f} ms after the forward"
        if t.get("overlapped_ms", 0) > 0:
            transfer += f" (streamed during its {t['overlapped_ms']:.1f} ms step)"
    return (f"[{res.finish_reason}, {len(res.token_ids)} tokens, {where}] queue {t.get('queue_ms', 0):.1f} ms | "
            f"prefill {t.get('prefill_ms', 0):.1f} ms | {transfer} | "
            f"decode {t.get('decode_ms', 0):.1f} ms | TTFT {t.get('ttft_ms', 0):.1f} ms | e2e {t.get('e2e_ms', 0):.1f} ms")


DEMO_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Explain in two sentences why the KV cache of a language model grows with the context, "
                "and why moving it between machines costs bandwidth."]


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the local cluster, stream a few chat requests through the gRPC API, print timings."""
    import asyncio
    from .client import Client, make_request
    from .deploy.ray_cluster import ServingCluster

    async def demo() -> None:
        cfg = _cluster_config(args)
        cfg = cfg.replace("router", local_prefill_max_tokens=min(cfg.router.local_prefill_max_tokens, 40),
                          grpc_port=args.port or 0, metrics_port=-1)
        # worker logs stay in Ray's log files (/tmp/ray/session_latest/logs) so they do not
        # interleave with the streamed answers
        cluster = ServingCluster(cfg, args.policy, worker_logs_to_driver=False)
        print("splitserve: starting a local Ray cluster "
              f"({cfg.cluster.num_prefill} prefill + {cfg.cluster.num_decode} decode workers) ...", flush=True)
        await cluster.start()
        addr = f"{cfg.router.host}:{cluster.grpc_port}"
        print(f"splitserve: serving on {addr}\n", flush=True)

        def run_requests() -> None:
            client = Client(addr)
            for prompt in DEMO_PROMPTS:
                print(f">>> {prompt}", flush=True)
                res = client.generate(make_request(messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=args.max_tokens),
                                      on_chunk=lambda ids, text: (sys.stdout.write(text), sys.stdout.flush()))
                print("\n" + _timing_line(res) + "\n", flush=True)
            client.close()
        try:
            await asyncio.to_thread(run_requests)
        finally:
            await cluster.stop()
    asyncio.run(demo())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    p = sub.add_parser("serve", help="start the router and worker pools on Ray and serve the gRPC API")
    _add_cluster_flags(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("demo", help="start a local cluster, stream a few requests through it, stop")
    _add_cluster_flags(p)
    p.add_argument("--max-tokens", type=int, default=48)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("client", help="send one request to a running server")
    p.add_argument("--address", required=True, help="HOST:PORT of the gRPC API")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:     # bad input or config: one clear line, no traceback
        print(f"splitserve: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import grpc
        if isinstance(exc, grpc.RpcError):
            print(f"splitserve: error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
