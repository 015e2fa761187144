"""Greedy argmax over a Llama-3 vocabulary: torch.argmax vs kernels/argmax.py, in a CUDA graph.

    python bench/argmax_bench.py [--out DIR]      # prints us per call, writes argmax-bench.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

from kbench import bench_graph  # noqa: E402
from splitserve.kernels.argmax import argmax_rows  # noqa: E402

VOCAB = 128256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp")
    args = ap.parse_args()
    rows = []
    for b in (1, 8, 32, 128, 256):
        x = [torch.randn(b, VOCAB, device="cuda") for _ in range(8)]    # 8 copies: L2 rotation
        assert all(torch.equal(argmax_rows(t), t.argmax(-1)) for t in x)
        t_torch = bench_graph([lambda t=t: t.argmax(-1) for t in x])
        t_split = bench_graph([lambda t=t: argmax_rows(t) for t in x])
        rows.append(dict(batch=b, vocab=VOCAB, torch_us=t_torch, split_us=t_split))
        print(f"B={b:>4}: torch.argmax {t_torch:7.1f} us, argmax_rows {t_split:7.1f} us", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "argmax-bench.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
