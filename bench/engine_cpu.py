"""CPU throughput of the engine on SmolLM2-135M vs transformers `generate`, in one process.

Both decode NEW tokens greedily from the same prompts (equal lengths, so transformers needs no
padding), eos disabled; each configuration is timed REPEAT times, alternating engine and
transformers, and the median is reported. Correctness is checked first (same tokens).

    python bench/engine_cpu.py [--repeat 3] [--new 64] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM
    from splitserve.config import Config
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.model_source import resolve
    from splitserve.engine.request import SamplingParams

    path = resolve("smollm2").path
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    eng = LLMEngine.from_config(Config().replace("model", device="cpu"))
    base = eng.tokenizer.encode("In the beginning of the twentieth century, the small harbour town was known "
                                "for its fishing fleet, its lighthouse and the long winters that kept the "
                                "boats in port for months. The children of the town learned to mend nets "
                                "before they could read, and every family kept a lamp in the window.")
    if len(base) < args.prompt_len:
        raise SystemExit(f"base prompt has {len(base)} tokens < --prompt-len {args.prompt_len}")
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    rows = []
    for bs in [int(b) for b in args.batches.split(",")]:
        prompts = [(base[i:] + base[:i])[: args.prompt_len] for i in range(bs)]

        def run_ours():
            eng.pool.reset_prefix_cache()
            return [o.token_ids for o in eng.generate(prompts, params)]

        def run_hf():
            with torch.inference_mode():
                g = hf.generate(torch.tensor(prompts), do_sample=False, max_new_tokens=args.new,
                                eos_token_id=-1, pad_token_id=0,
                                attention_mask=torch.ones(bs, args.prompt_len, dtype=torch.long))
            return g[:, len(prompts[0]):].tolist()

        same = run_ours() == run_hf()
        t_ours, t_hf = [], []
        for _ in range(args.repeat):
            for fn, acc in ((run_ours, t_ours), (run_hf, t_hf)):
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
        ours, theirs = statistics.median(t_ours), statistics.median(t_hf)
        rows.append({"batch": bs, "prompt_len": args.prompt_len, "new_tokens": args.new, "same_tokens": same,
                     "engine_tok_s": bs * args.new / ours, "transformers_tok_s": bs * args.new / theirs,
                     "engine_s": t_ours, "transformers_s": t_hf, "ratio": theirs / ours})
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"date": date.today().isoformat(), "commit": commit, "torch_threads": torch.get_num_threads(),
              "command": "python bench/engine_cpu.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                                   vars(args).items()), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"engine_cpu-{result['date']}.json").write_text(json.dumps(result, indent=2))
    print(f"{'batch':>5} {'same':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {str(r['same_tokens']):>5} {r['engine_tok_s']:>13.1f} "
              f"{r['transformers_tok_s']:>19.1f} {r['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
