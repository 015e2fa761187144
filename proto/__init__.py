"""splitserve.proto: the gRPC schema (splitserve.proto) and its generated stubs.

Stubs are not committed: `load()` generates them with grpc_tools on first use (into this folder
when it is writable, else into ~/.cache/splitserve/proto) and imports them.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

_HERE = Path(__file__).resolve().parent
_PROTO = _HERE / "splitserve.proto"
_lock = threading.Lock()
_cache: tuple[ModuleType, ModuleType] | None = None


def _out_dir() -> Path:
    if os.access(_HERE, os.W_OK):
        return _HERE
    d = Path.home() / ".cache" / "splitserve" / "proto"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _generate(out: Path) -> None:
    from grpc_tools import protoc
    import grpc_tools
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{_HERE}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", str(_PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {_PROTO} (exit {rc})")


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load() -> tuple[ModuleType, ModuleType]:
    """(splitserve_pb2, splitserve_pb2_grpc), generated if missing or older than the .proto."""
    global _cache
    with _lock:
        if _cache is None:
            out = _out_dir()
            pb2, grpc_mod = out / "splitserve_pb2.py", out / "splitserve_pb2_grpc.py"
            stale = not pb2.exists() or not grpc_mod.exists() or pb2.stat().st_mtime < _PROTO.stat().st_mtime
            if stale:
                _generate(out)
            # the generated grpc module does `import splitserve_pb2`
            pb = _import(pb2, "splitserve_pb2")
            _cache = (pb, _import(grpc_mod, "splitserve_pb2_grpc"))
        return _cache
