"""WorkerPool: the router's registry of worker actors, their health, load snapshots and output pumps.

Workers are Ray actor handles (deploy/ builds them); every remote call goes through `call()`,
which turns a dead actor into `WorkerDied` and removes it from routing. A pump task per decode
worker long-polls `take_outputs` and hands each record to the router. Pools change at run time:
`add()` a worker, or `remove()` one gracefully (drain: no new requests, wait until idle, stop).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("splitserve.router")


class WorkerDied(Exception):
    def __init__(self, name: str, why: str):
        super().__init__(f"worker {name} is gone ({why})")
        self.name = name


@dataclass
class Worker:
    name: str
    role: str
    actor: Any
    snapshot: dict = field(default_factory=dict)
    pump: asyncio.Task | None = None
    last_ok: float = field(default_factory=time.monotonic)


def _is_death(exc: BaseException) -> bool:
    import ray.exceptions as rex
    return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError, rex.ActorDiedError))


class WorkerPool:
    def __init__(self, health_interval_s: float = 1.0, metrics=None):
        self.workers: dict[str, Worker] = {}
        self.dead: frozenset[str] = frozenset()
        self.health_interval_s = health_interval_s
        self.metrics = metrics
        self.on_decode_output: Callable[[str, dict], None] = lambda w, r: None
        self.on_decode_died: Callable[[str], None] = lambda w: None
        self.assigned: Callable[[str], int] = lambda w: 0    # the router's unfinished flights on a worker
        self._health: asyncio.Task | None = None

    # ------------------------------------------------------------ registry
    async def add(self, name: str, role: str, actor: Any, timeout: float = 600.0) -> None:
        w = Worker(name, role, actor)
        try:   # the first call waits for the actor's constructor (model load, UCX self-test)
            w.snapshot = await asyncio.wait_for(self._remote(w, "snapshot"), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"worker {name} did not start within {timeout:.0f}s (no free resources "
                               "in the Ray cluster, or a slow model load)") from None
        self.workers[name] = w
        self.dead = self.dead - {name}
        if role == "decode":
            w.pump = asyncio.create_task(self._pump(w))
        self._count()
        log.info("worker %s (%s) joined", name, role)

    async def remove(self, name: str, timeout: float = 120.0) -> None:
        """Drain a worker (no new requests), wait for its requests to finish, then stop it.

        Idle means the worker's own queues are empty *and* the router has no unfinished flight on
        it (a request placed just before the drain may not have reached the worker yet). What is
        still there after `timeout` is handed over as if the worker had died: decode flights
        migrate to another decode worker, prefills are retried elsewhere. Nothing is dropped."""
        w = self.workers[name]
        w.snapshot = {**w.snapshot, "draining": True}    # the router places nothing here from now on
        await self._remote(w, "drain")
        if not await self._wait_idle(w, timeout):
            log.warning("worker %s still busy after %.0fs of draining; handing its requests over", name, timeout)
            self._mark_dead(w, "drain timed out")
        if w.pump:
            await asyncio.sleep(0.6)       # let the pump deliver the last outputs
            w.pump.cancel()
        await self.try_call(name, "shutdown")
        self.workers.pop(name, None)
        self._count()
        log.info("worker %s removed after draining", name)

    async def _wait_idle(self, w: Worker, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = await self._remote(w, "snapshot")
            if s["num_running"] + s["num_waiting"] + s["num_transferring"] + self.assigned(w.name) == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    def names(self, role: str) -> list[str]:
        return [w.name for w in self.workers.values() if w.role == role and w.name not in self.dead]

    def decode_names(self) -> list[str]:
        return self.names("decode")

    def snapshots(self, role: str) -> list[dict]:
        return [self.workers[n].snapshot for n in self.names(role)]

    # ------------------------------------------------------------ calls
    async def _remote(self, w: Worker, method: str, *args: Any) -> Any:
        try:
            return await getattr(w.actor, method).remote(*args)
        except Exception as exc:
            if _is_death(exc):
                self._mark_dead(w, repr(exc)[:200])
                raise WorkerDied(w.name, type(exc).__name__) from exc
            raise

    async def call(self, name: str, method: str, *args: Any) -> Any:
        w = self.workers.get(name)
        if w is None or name in self.dead:
            raise WorkerDied(name, "not registered")
        return await self._remote(w, method, *args)

    async def try_call(self, name: str | None, method: str, *args: Any) -> Any:
        """Best effort (abort, shutdown): errors are logged, not raised."""
        if name is None:
            return None
        try:
            return await self.call(name, method, *args)
        except Exception as exc:
            log.debug("%s.%s failed: %r", name, method, exc)
            return None

    def _mark_dead(self, w: Worker, why: str) -> None:
        if w.name in self.dead:
            return
        log.error("worker %s (%s) died: %s", w.name, w.role, why)
        self.dead = self.dead | {w.name}
        self._count()
        if w.pump and w.pump is not asyncio.current_task():
            w.pump.cancel()
        if w.role == "decode":
            self.on_decode_died(w.name)

    def _count(self) -> None:
        if self.metrics is not None:
            for role in ("prefill", "decode"):
                self.metrics.workers.labels(role).set(len(self.names(role)))

    # ------------------------------------------------------------ background tasks
    async def _pump(self, w: Worker) -> None:
        while w.name not in self.dead:
            try:
                recs = await self._remote(w, "take_outputs", 0.5)
            except WorkerDied:
                return
            except Exception as exc:
                log.error("pump %s: %r", w.name, exc)
                await asyncio.sleep(0.2)
                continue
            for rec in recs:
                self.on_decode_output(w.name, rec)

    def start_health(self) -> None:
        self._health = asyncio.create_task(self._health_loop())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._refresh(w) for w in list(self.workers.values())
                                   if w.name not in self.dead))
            await asyncio.sleep(self.health_interval_s)

    async def _refresh(self, w: Worker) -> None:
        try:
            snap = await asyncio.wait_for(self._remote(w, "snapshot"), timeout=max(5.0, 5 * self.health_interval_s))
        except WorkerDied:
            return
        except Exception as exc:       # slow or erroring, not (yet) dead
            log.warning("health check of %s failed: %r", w.name, exc)
            return
        w.snapshot = {**snap, "draining": snap["draining"] or w.snapshot.get("draining", False)}
        w.last_ok = time.monotonic()
        if self.metrics is not None:
            self.metrics.observe_snapshot(snap)

    async def close(self) -> None:
        if self._health:
            self._health.cancel()
        for w in self.workers.values():
            if w.pump:
                w.pump.cancel()
