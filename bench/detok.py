"""Per-token cost of streaming text: whole-output decoding vs IncrementalDetokenizer, same run.

Each of --streams streams grows to --tokens tokens, one token at a time (tokens from the SmolLM2
tokenizer encoding real text, so multi-byte characters split across tokens); at each token the
baseline decodes the whole output (what the engine and the router did before) and the new path
updates an IncrementalDetokenizer. Also times the router's whole per-token path
(`Router._add_tokens`: dedupe, metrics, detokenize, stop strings, event) with its real code.

    python bench/detok.py [--tokens 400] [--streams 64] [--out bench/results]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import date
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.validate_sim import git_commit  # noqa: E402

TEXT = "Héllo wörld, naïve café in 東京 and Zürich 🚀; the quick brown fox jumps over the lazy dog. " * 40


def per_token_us(fn, streams: int, tokens: int) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) / (streams * tokens) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--out", default="bench/results")
    a = ap.parse_args()
    from splitserve.config import RouterConfig
    from splitserve.engine.detokenizer import IncrementalDetokenizer
    from splitserve.engine.loader import load_tokenizer
    from splitserve.engine.model_source import resolve
    from splitserve.router.policy import build_policy
    from splitserve.router.router import Router
    tok = load_tokenizer(resolve("smollm2", None))
    ids = tok.encode(TEXT)[:a.tokens]
    if len(ids) < a.tokens:
        raise SystemExit(f"the sample text gives only {len(ids)} tokens; use --tokens <= {len(ids)}")

    def whole():
        for _ in range(a.streams):
            out: list[int] = []
            for t in ids:
                out.append(t)
                tok.decode(out).rstrip("\ufffd")

    def incremental():
        for _ in range(a.streams):
            det = IncrementalDetokenizer(tok)
            for t in ids:
                det.append([t])

    class Pool:                      # the router's worker pool is not exercised here
        dead = frozenset()
        on_decode_output = on_decode_died = None

        def names(self, role):
            return ["d0"] if role == "decode" else []

        def decode_names(self):
            return ["d0"]

    async def router_path():
        r = Router(RouterConfig(), tok, 8192, Pool(), build_policy("load_aware", RouterConfig()))
        fs = [r.admit(None, [5, 6, 7], None, {"max_tokens": a.tokens}) for _ in range(a.streams)]
        t = time.perf_counter()
        for i, tid in enumerate(ids):
            for f in fs:
                r._add_tokens(f, i, [tid])
        return (time.perf_counter() - t) / (a.streams * a.tokens) * 1e6

    res = {"date": date.today().isoformat(), "commit": git_commit(),
           "command": "python bench/detok.py " + " ".join(sys.argv[1:]), "tokens": a.tokens, "streams": a.streams,
           "whole_us": per_token_us(whole, a.streams, a.tokens),
           "incremental_us": per_token_us(incremental, a.streams, a.tokens),
           "router_add_tokens_us": asyncio.run(router_path())}
    res["speedup"] = res["whole_us"] / res["incremental_us"]
    lines = [f"# Streaming detokenization per token ({res['date']}, commit `{res['commit']}`)", "",
             f"- Command: `{res['command']}` (SmolLM2 tokenizer, {a.streams} streams x {a.tokens} tokens, "
             "one token per update, this 2-core VM)",
             f"- Whole-output decode per token (the old engine/router code): **{res['whole_us']:.1f} us**",
             f"- IncrementalDetokenizer per token: **{res['incremental_us']:.1f} us** ({res['speedup']:.1f}x less)",
             f"- The router's whole per-token path now (`Router._add_tokens`): {res['router_add_tokens_us']:.1f} us"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"detok-{res['date']}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"detok-{res['date']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
