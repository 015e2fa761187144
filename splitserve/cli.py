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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitserve", description="disaggregated prefill/decode LLM serving")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:     # bad input or config: one clear line, no traceback
        print(f"splitserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
