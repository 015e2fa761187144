"""Can verifying a GPU-to-GPU copy hide inside the copy on one GPU? (issue 5, diagnostic)

    python3 bench/verify_bound.py --gib 8 --chunk-mib 16,64,256 --reps 5

One process, torch only (no UCX): the HBM side of a verified handoff between two processes that
share one GPU. Times, each the median of --reps:
  copy           dst.copy_(src), the bytes a cuda_ipc send moves (read + write)
  sum            one wrapping int64 sum of dst (a receiver's check: one read of every byte)
  copy, sum      the two in sequence
  concurrent     the copy on one stream while another sums a third buffer of the same size
  chunked C      the copy in chunks of C MiB on one stream, each chunk summed on a second stream
                 right after it lands (while it may still be in the 50 MB L2); one CUDA graph
Prints each and copy / that, the share of the plain copy's speed a verified copy keeps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--chunk-mib", default="16,64,256")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    n = int(a.gib * (1 << 30)) // 8 * 8
    src, dst, other = (torch.empty(n, dtype=torch.uint8, device="cuda") for _ in range(3))
    src.random_(0, 255)
    other.random_(0, 255)
    side = torch.cuda.Stream()

    def word_sum(t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.int64).sum()

    def concurrent() -> None:
        main_stream = torch.cuda.current_stream()
        side.wait_stream(main_stream)
        dst.copy_(src)
        with torch.cuda.stream(side):
            word_sum(other)
        main_stream.wait_stream(side)

    def chunked(step: int):
        """Captured in a CUDA graph: hundreds of chunks would otherwise be host-bound."""
        def body() -> None:
            main_stream = torch.cuda.current_stream()
            side.wait_stream(main_stream)
            for i in range(0, n, step):
                dst[i:i + step].copy_(src[i:i + step])
                ev = torch.cuda.Event()
                ev.record()
                with torch.cuda.stream(side):
                    side.wait_event(ev)
                    word_sum(dst[i:i + step])
            main_stream.wait_stream(side)
        body()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        return g.replay

    rows = [("copy", lambda: dst.copy_(src)), ("sum", lambda: word_sum(dst)),
            ("copy, sum", lambda: (dst.copy_(src), word_sum(dst))), ("concurrent", concurrent)]
    rows += [(f"chunked {c}", chunked(int(c) << 20)) for c in a.chunk_mib.split(",")]
    times = {name: timed(fn, a.reps) for name, fn in rows}
    base = times["copy"]
    print(f"{n / 2**30:.1f} GiB on {torch.cuda.get_device_name()}")
    for name, t in times.items():
        print(f"  {name:>12}: {t * 1e3:8.3f} ms   copy / this {base / t:5.2f}x")
    if int(word_sum(dst)) != int(word_sum(src)):
        raise SystemExit("the copy's sum does not match")


if __name__ == "__main__":
    main()
