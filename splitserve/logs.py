"""Structured logs: one JSON object per line with time, level, logger, component, message and,
when the call passes `extra={"request_id": ...}`, the request id.

    from splitserve.logs import setup_logging, req
    setup_logging("router")
    log.warning("retrying on %s", p, extra=req(rid))
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

_FIELDS = ("request_id", "worker", "lease_id")


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "time": time.strftime("%H:%M:%S", time.localtime(record.created)),
               "level": record.levelname, "logger": record.name, "component": self.component,
               "pid": os.getpid(), "msg": record.getMessage()}
        for f in _FIELDS:
            if hasattr(record, f):
                out[f] = getattr(record, f)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(component: str, level: str = "INFO") -> None:
    """Route the `splitserve` loggers to stderr as JSON lines (idempotent per process)."""
    root = logging.getLogger("splitserve")
    if any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


def req(request_id: str, **more) -> dict:
    """`extra=` for a log call about one request."""
    return {"request_id": request_id, **more}
