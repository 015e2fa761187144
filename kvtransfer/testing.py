"""Multi-process harness for kvtransfer tests and benchmarks (one agent per process).

`spawn_worker(...)` starts a process holding a random KV pool and a TransferAgent and returns a
`WorkerProxy`; `proxy.call("method", *args)` runs a `PoolWorker` method there. Processes are
started with the spawn context, so nothing from the parent's UCX state leaks into them.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from typing import Any

import torch

from .testing_raw import RawBaseline


class PoolWorker(RawBaseline):
    """Lives in the child: a KV pool, a free list standing in for the engine's block pool,
    and the agent."""

    def __init__(self, layout_kw: dict, seed: int, config_kw: dict, model: str, device: str) -> None:
        from splitserve.config import TransferConfig
        from .agent import TransferAgent
        from .layout import KVLayout
        from .pool import torch_dtype
        self.layout = KVLayout(**layout_kw)
        g = torch.Generator(device=device).manual_seed(seed)
        n_words = self.layout.num_layers * 2 * self.layout.num_blocks * self.layout.region_bytes // 4
        raw = torch.randint(-2**31, 2**31 - 1, (n_words,), generator=g, dtype=torch.int32,
                            device=device)
        self.kv = raw.view(torch_dtype(self.layout)).view(self.layout.shape)
        self.scales = (torch.rand((self.layout.num_layers, 2, self.layout.num_kv_heads),
                                  generator=torch.Generator().manual_seed(7)).to(device)
                       if self.layout.has_scales else None)
        self.free = set(range(self.layout.num_blocks))
        self.free_calls: list[list[int]] = []
        self.agent = TransferAgent(self.kv, self.layout, TransferConfig(**config_kw), model=model,
                                   free_blocks=self._free_blocks, scales=self.scales)
        self.senders: dict[int, Any] = {}

    def _free_blocks(self, ids: list[int]) -> None:
        dup = self.free.intersection(ids)
        if dup:
            raise AssertionError(f"blocks {sorted(dup)} freed twice")
        self.free.update(ids)
        self.free_calls.append(list(ids))

    # ---- decode side ---------------------------------------------------------------------
    def reserve(self, ids: list[int] | None = None, n: int = 0, seed: int = 0,
                prepost: bool | None = None) -> dict:
        if ids is None:
            g = torch.Generator().manual_seed(seed)
            pick = torch.randperm(len(self.free), generator=g)[:n].tolist()
            ids = [sorted(self.free)[i] for i in pick]
        missing = set(ids) - self.free
        if missing:
            raise AssertionError(f"blocks {sorted(missing)[:5]} are not free")
        self.free.difference_update(ids)
        return self.agent.reserve(ids, prepost=prepost).to_dict()

    def poison(self, ids: list[int]) -> None:
        self.kv[:, :, ids] = 0
        if self.kv.is_cuda:   # done before any peer's write: UCX copies on its own streams
            torch.cuda.synchronize()

    def wait_lease(self, lease_id: int, timeout: float) -> tuple[str, str]:
        st = self.agent.wait_lease(lease_id, timeout)
        return st.state.value, st.reason

    def cancel(self, lease_id: int) -> bool:
        return self.agent.cancel(lease_id)

    def reissue(self, lease_id: int) -> dict:
        return self.agent.reissue(lease_id).to_dict()

    def integrity(self) -> dict:
        self.agent.leases.check_integrity()
        return {"free": len(self.free), "free_calls": len(self.free_calls),
                "live": self.agent.leases.live_count(), "freed_count": self.agent.leases.freed_count,
                "records": len(self.agent.leases._leases), "statuses": len(self.agent._rx_status)}

    def dropped(self) -> float:
        """Stray data messages the sweeper has drained (late, duplicate or refused writes)."""
        from .metrics import dropped_messages
        return dropped_messages()._value.get()

    def release_completed(self, ids: list[int]) -> None:
        """The request finished: its blocks go back to the pool (engine's job, not the lease's)."""
        self.free.update(ids)

    # ---- prefill side --------------------------------------------------------------------
    def send(self, handoff: dict, src: list[int], layer_delay_s: float = 0.0,
             wait: bool = True, timeout: float = 60.0, corrupt: str = "") -> tuple[str, str]:
        from .wire import HandoffRecord
        rec = HandoffRecord.from_dict(handoff)
        s = self.agent.open_sender(rec, src)
        if corrupt == "checksum":
            s.complete_hook = lambda c: {**c, "checksums": [x ^ 1 for x in c["checksums"]]}
        elif corrupt == "epoch":
            s.complete_hook = lambda c: {**c, "epoch": c["epoch"] - 1}
        self.senders[(rec.port, rec.lease_id)] = s

        def forward() -> None:   # stands in for the prefill forward pass
            for layer in range(self.layout.num_layers):
                if layer_delay_s:
                    time.sleep(layer_delay_s)
                s.push_layer(layer)
        if not wait:
            threading.Thread(target=forward, daemon=True).start()
            return ("pending", "")
        forward()
        st = s.wait(timeout)
        return st.state.value, st.reason

    def sender_status(self, handoff: dict, timeout: float = 0.0) -> tuple[str, str]:
        st = self.senders[(handoff["port"], handoff["lease_id"])].wait(timeout)
        return st.state.value, st.reason

    def sender_posted(self, handoff: dict) -> int:
        """Data messages the sender of `handoff` handed to UCX."""
        return self.senders[(handoff["port"], handoff["lease_id"])].msgs_posted

    def sender_path(self, handoff: dict) -> str:
        """How the sender of `handoff` moved the data: "tag" or "rma"."""
        return self.senders[(handoff["port"], handoff["lease_id"])].data_path

    def delay_next_begin(self, seconds: float) -> None:
        """Fault injection: the next `begin` this (decode) agent receives is handled only after
        `seconds`, so its sender's early data is surely on the wire before the answer."""
        import asyncio
        agent = self.agent
        orig = agent._begin

        async def slow(peer, msg):
            agent._begin = orig
            await asyncio.sleep(seconds)
            await orig(peer, msg)
        agent._begin = slow

    def sender_side(self) -> dict:
        """What the prefill side still holds: cached peers and unfinished senders."""
        return self.agent.call(self._sender_side())

    async def _sender_side(self) -> dict:
        return {"peers": len(self.agent.peers),
                "active_senders": sum(len(p.senders) for p in self.agent.peers.values())}

    def sender_cancel(self, handoff: dict) -> bool:
        return self.senders[(handoff["port"], handoff["lease_id"])].cancel()

    def blocks(self, ids: list[int]) -> torch.Tensor:
        return self.kv[:, :, ids].cpu().contiguous()

    def self_test(self) -> dict:
        r = self.agent.self_test_report
        return {} if r is None else {"transports": r.transports, "gbps": r.bandwidth_gbps,
                                     "ok": r.ok, "resources": r.context_resources}

    # ---- benchmark support (the raw baselines: testing_raw.RawBaseline) ----------------------
    def timed_send(self, handoff: dict, src: list[int], timeout: float = 300.0) -> dict:
        """All layers ready up front (push_all): time from open to verified Success."""
        from .wire import HandoffRecord
        if self.kv.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        s = self.agent.open_sender(HandoffRecord.from_dict(handoff), src)
        s.push_all()
        st = s.wait(timeout)
        return {"state": st.state.value, "reason": st.reason, "seconds": time.perf_counter() - t0,
                "t0": t0, "trace": s.trace, "prep_s": s.prep_s, "send_s": s.send_s,
                "data_path": s.data_path}

    def rtt(self, addr, n: int = 20) -> list[float]:
        return self.agent.rtt(tuple(addr), n)

    def executor_hop(self, n: int = 20) -> list[float]:
        """Seconds of an empty round trip loop thread -> torch executor -> loop thread."""
        async def hops():
            import asyncio
            loop, out = asyncio.get_running_loop(), []
            for _ in range(n):
                t0 = time.perf_counter()
                await loop.run_in_executor(self.agent.executor, lambda: None)
                out.append(time.perf_counter() - t0)
            return out
        return self.agent.call(hops(), timeout=60)

    def rx_trace(self, lease_id: int) -> list:
        return list(self.agent.rx_traces.get(lease_id, []))

    def overlapped_send(self, handoff: dict, src: list[int], tokens: int, hidden: int,
                        ffn: int, timeout: float = 300.0, layer_kind: str = "matmul2",
                        heads: tuple[int, int, int] = (32, 8, 128)) -> dict:
        """A prefill-shaped forward pushing each layer's KV as the model would; returns the
        exposed transfer time after the forward's end.

        layer_kind "matmul2": per layer [tokens, hidden] @ [hidden, ffn] @ [ffn, hidden], the push
        after both (the proxy of benchmark runs v1-v13). "llama": a Llama decoder layer of those
        sizes, `heads` = (q heads, kv heads, head dim): QKV projection, causal attention (torch
        flash SDPA), the push right after attention as engine/model.py's after_layer, then the
        output projection and the gated MLP (gate_up, SiLU * up, down)."""
        from .wire import HandoffRecord
        dev, dt = self.kv.device, (torch.bfloat16 if self.kv.is_cuda else torch.float32)
        g = torch.Generator(device=dev).manual_seed(0)

        def w(*shape):
            return torch.randn(*shape, device=dev, dtype=dt, generator=g) / shape[0] ** 0.5

        x0 = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=g)
        sync = torch.cuda.synchronize if self.kv.is_cuda else (lambda: None)
        if layer_kind == "matmul2":
            w1, w2 = w(hidden, ffn), w(ffn, hidden)

            def layer(h, push):
                y = torch.relu(h @ w1) @ w2
                push()
                return y
        elif layer_kind == "llama":
            hq, hkv, d = heads
            wqkv, wo, wgu, wd = w(hidden, (hq + 2 * hkv) * d), w(hq * d, hidden), w(hidden, 2 * ffn), w(ffn, hidden)

            if self.kv.is_cuda:   # flash attention, as a serving engine's prefill would run
                from torch.nn.attention import SDPBackend, sdpa_kernel
                backend = lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)   # noqa: E731
            else:
                import contextlib
                backend = contextlib.nullcontext

            def layer(h, push):
                q, k, v = (h @ wqkv).split([hq * d, hkv * d, hkv * d], dim=-1)
                q, k, v = (t.view(1, tokens, -1, d).transpose(1, 2) for t in (q, k, v))
                k, v = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))   # GQA
                with backend():
                    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                push()                       # the layer's KV is written: engine/model.py's hook
                h = h + o.transpose(1, 2).reshape(tokens, hq * d) @ wo
                gate, up = (h @ wgu).chunk(2, dim=-1)
                return h + (torch.nn.functional.silu(gate) * up) @ wd
        else:
            raise ValueError(f"layer_kind {layer_kind!r}: use matmul2 or llama")

        x = x0
        for _ in range(2):
            x = layer(x0, lambda: None)   # warm-up
        sync()
        t0 = time.perf_counter()
        x = x0
        for _ in range(self.layout.num_layers):
            x = layer(x, lambda: None)
        sync()
        compute_only = time.perf_counter() - t0
        s = self.agent.open_sender(HandoffRecord.from_dict(handoff), src)
        t0 = time.perf_counter()
        x = x0
        for i in range(self.layout.num_layers):
            x = layer(x, lambda i=i: s.push_layer(i))
        sync()
        t_last = time.perf_counter()
        st = s.wait(timeout)
        t_done = time.perf_counter()
        del x
        return {"state": st.state.value, "reason": st.reason, "t0": t_last, "trace": s.trace,
                "layer_s": compute_only / self.layout.num_layers, "compute_only_s": compute_only,
                "forward_with_transfer_s": t_last - t0, "exposed_s": t_done - t_last,
                "layer_kind": layer_kind, "heads": list(heads), "data_path": s.data_path}

    def digest(self, ids: list[int]) -> str:
        import hashlib
        return hashlib.sha1(self.kv[:, :, ids].contiguous().view(torch.uint8).cpu().numpy()
                            .tobytes()).hexdigest()

    def peer_transports(self) -> dict:
        from .selftest import ep_info, lane_transports
        return self.agent.call(self._peer_transports(ep_info, lane_transports))

    async def _peer_transports(self, ep_info, lane_transports) -> dict:
        return {p.name: lane_transports(ep_info(p.ep)) for p in self.agent.peers.values()}

    def exec(self, code: str) -> None:
        """Benchmark/diagnostic hook: run a statement in the worker process."""
        exec(code, {"self": self})

    def pid(self) -> int:
        return os.getpid()


def _serve(conn, args, env: dict | None = None) -> None:
    os.environ.update(env or {})     # before CUDA starts (e.g. CUDA_VISIBLE_DEVICES: one GPU each)
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(process)d %(message)s")
    logging.getLogger("splitserve.kvtransfer").setLevel(logging.INFO)
    try:
        obj = PoolWorker(*args)
        conn.send(("ok", obj.agent.address))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    while True:
        try:
            method, a, kw = conn.recv()
        except EOFError:
            break
        if method == "__exit__":
            obj.agent.close()
            conn.send(("ok", None))
            break
        try:
            conn.send(("ok", getattr(obj, method)(*a, **kw)))
        except BaseException:
            conn.send(("err", traceback.format_exc()))


class WorkerProxy:
    def __init__(self, proc, conn, address) -> None:
        self.proc, self.conn, self.address = proc, conn, address

    def call(self, method: str, *args, timeout: float = 120.0, **kw) -> Any:
        self.conn.send((method, args, kw))
        if not self.conn.poll(timeout):
            raise TimeoutError(f"worker call {method} took over {timeout}s")
        status, val = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"worker call {method} failed:\n{val}")
        return val

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(10)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("__exit__", timeout=15)
            except Exception:
                pass
            self.proc.join(5)
        self.kill()


def spawn_worker(layout_kw: dict, seed: int, config_kw: dict | None = None,
                 model: str = "test-model", device: str = "cpu",
                 start_timeout: float = 120.0, env: dict | None = None) -> WorkerProxy:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    cfg = {"self_test": False, "lease_timeout_s": 20.0, **(config_kw or {})}
    proc = ctx.Process(target=_serve, args=(child, (layout_kw, seed, cfg, model, device), env),
                       daemon=True)
    proc.start()
    if not parent.poll(start_timeout):
        proc.kill()
        raise TimeoutError("worker did not start")
    status, val = parent.recv()
    if status != "ok":
        proc.kill()
        raise RuntimeError(f"worker failed to start:\n{val}")
    return WorkerProxy(proc, parent, tuple(val))
