"""The `splitserve generate` command line (as other tools call it) and the config tree."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitserve.config import Config, config_from_dict, field_docs, load_config, CacheConfig


def _cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "splitserve", *args], capture_output=True, text=True,
                          check=check, timeout=600)


@pytest.mark.slow
def test_generate_json_on_the_real_model():
    out = _cli("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--json")
    obj = json.loads(out.stdout)
    assert set(obj) >= {"token_ids", "text", "finish_reason", "prompt_token_ids"}
    assert len(obj["token_ids"]) <= 8 and obj["finish_reason"] in ("stop", "length")
    assert "Paris" in obj["text"]


@pytest.mark.slow
def test_generate_batch_and_chat_stream():
    out = _cli("generate", "--model", "dummy:tiny", "--prompt", "a", "--prompt", "bb", "--max-tokens", "4",
               "--json", "--temperature", "0.9", "--seed", "3")
    objs = json.loads(out.stdout)["outputs"]
    assert len(objs) == 2 and all(len(o["token_ids"]) <= 4 for o in objs)
    again = json.loads(_cli("generate", "--model", "dummy:tiny", "--prompt", "a", "--prompt", "bb",
                            "--max-tokens", "4", "--json", "--temperature", "0.9", "--seed", "3").stdout)
    assert [o["token_ids"] for o in again["outputs"]] == [o["token_ids"] for o in objs]   # seeded
    chat = _cli("generate", "--prompt", "Say hi", "--chat", "--max-tokens", "6")
    assert chat.stdout.strip()


def test_bad_input_is_one_clear_line():
    r = _cli("generate", "--model", "dummy:tiny", "--prompt", "x", "--top-p", "2", check=False)
    assert r.returncode == 2 and "top_p" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "--model", "/nonexistent/m.gguf", "--prompt", "x", check=False)
    assert r.returncode == 2 and "/nonexistent/m.gguf" in r.stderr


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="cache.block_size"):
        config_from_dict({"cache": {"block_size": 7}})
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({"cache": {"blocksize": 16}})
    with pytest.raises(ValueError, match="unknown field"):
        config_from_dict({"nope": {}})
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  model: dummy:tiny\ncache:\n  block_size: 32\n")
    cfg = load_config(p)
    assert cfg.model.model == "dummy:tiny" and cfg.cache.block_size == 32
    assert cfg == config_from_dict({"model": {"model": "dummy:tiny"}, "cache": {"block_size": 32}})
    with pytest.raises(Exception):
        cfg.cache.block_size = 8          # frozen
    assert all(field_docs(CacheConfig).values()), "every field has a doc line"
    assert Config().replace("cache", kv_dtype="fp8_e4m3").cache.kv_dtype == "fp8_e4m3"


def test_block_size_auto_follows_the_kv_dtype():
    """block_size 0 (the default) = 16 tokens, 32 for FP8 caches (full-sector V page rows);
    an explicit size always wins."""
    assert Config().cache.block_size == 0 and Config().cache.tokens_per_block == 16
    assert Config().replace("cache", kv_dtype="fp8_e4m3").cache.tokens_per_block == 32
    assert Config().replace("cache", kv_dtype="fp8_e4m3", block_size=16).cache.tokens_per_block == 16
    assert Config().replace("cache", kv_dtype="bfloat16", block_size=64).cache.tokens_per_block == 64


def test_demo_timing_line_says_what_the_transfer_time_is():
    """A remote prefill's transfer time is what is left after the forward (the push streams
    layer by layer during it): the line says so and names the step it overlapped; a local
    prefill moves no KV and shows none."""
    from types import SimpleNamespace
    from splitserve.cli import _timing_line
    timing = {"queue_ms": 0.1, "prefill_ms": 216.4, "transfer_ms": 0.04, "overlapped_ms": 210.3,
              "decode_ms": 2699.2, "ttft_ms": 220.1, "e2e_ms": 2919.3}
    remote = SimpleNamespace(finish_reason="length", token_ids=[1] * 48, timing=timing,
                             info={"remote_prefill": True, "prefill_worker": "prefill-0",
                                   "decode_worker": "decode-0"})
    line = _timing_line(remote)
    assert "prefill prefill-0 -> decode decode-0" in line
    assert "transfer 0.04 ms after the forward (streamed during its 210.3 ms step)" in line
    local = SimpleNamespace(finish_reason="stop", token_ids=[1] * 8, timing=dict(timing, transfer_ms=0.0),
                            info={"remote_prefill": False, "decode_worker": "decode-0"})
    assert "transfer - |" in _timing_line(local) and "local prefill on decode-0" in _timing_line(local)
