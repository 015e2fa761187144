"""Layer-wise push plumbing, without Ray or UCX: the engine's step_hook sees every step, and the
after_layer(i) it returns runs once per layer, in order, after layer i's KV for the step is in the
pool (the prefill worker pushes that layer from there); GPU-worker environment helpers."""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

from splitserve.config import Config  # noqa: E402
from splitserve.engine.engine import LLMEngine  # noqa: E402
from splitserve.engine.request import SamplingParams  # noqa: E402


def _engine(budget: int, attention: str = "torch") -> LLMEngine:
    dtype = "bfloat16" if attention == "triton" else "float32"   # the Triton kernels take 16-bit
    cfg = (Config().replace("model", model="dummy:tiny", device="cpu", dtype=dtype)
           .replace("scheduler", max_num_batched_tokens=budget, max_model_len=512)
           .replace("cache", num_blocks=64))
    return LLMEngine.from_config(cfg, attention=attention)


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_after_layer_sees_each_layers_kv_written(attention):
    eng = _engine(budget=24, attention=attention)
    L = eng.arch.num_layers
    kv = eng.kv_cache.kv                       # [L, 2, blocks, block_size, heads, dim]
    prompt = list(range(5, 45))                # 40 tokens: chunks of 24 + 16 under the budget
    seen = []                                  # (step, layer, written, later layer still empty)

    def hook(sched):
        chunk = sched.chunks[0]
        if not chunk.samples:                  # only the step that completes the prompt
            seen.append(("skip", chunk.start))
            return None
        bs = eng.pool.block_size
        slots = [chunk.request.blocks[p // bs].block_id * bs + p % bs
                 for p in range(chunk.start, chunk.start + chunk.num_new_tokens)]
        flat = kv.view(L, 2, -1, *kv.shape[-2:])

        def after_layer(i):
            written = bool(flat[i, :, slots].abs().sum() > 0)
            later_empty = i + 1 == L or bool(flat[i + 1, :, slots].abs().sum() == 0)
            seen.append((chunk.start, i, written, later_empty))
        return after_layer

    kv.zero_()
    eng.step_hook = hook
    out = eng.generate([prompt], SamplingParams(max_tokens=1))[0]
    assert len(out.token_ids) == 1
    assert seen[0] == ("skip", 0)              # the first chunk does not complete the prompt
    calls = seen[1:]
    assert [c[1] for c in calls] == list(range(L))          # each layer once, in order
    assert all(c[0] == 24 for c in calls)                   # inside the completing chunk's step
    assert all(c[2] for c in calls), "after_layer(i) ran before layer i's KV was written"
    assert all(c[3] for c in calls), "after_layer(i) ran after a later layer had been written"


def test_hook_forces_the_eager_path_and_matches_the_plain_step():
    """A step with a hook gives the same token as one without (graphs/eager are equivalent)."""
    a, b = _engine(64), _engine(64)
    b.step_hook = lambda sched: (lambda i: None)
    p = list(range(3, 30))
    ta = a.generate([p], SamplingParams(max_tokens=4))[0].token_ids
    tb = b.generate([p], SamplingParams(max_tokens=4))[0].token_ids
    assert ta == tb


def test_own_gpu_first_orders_visible_devices(monkeypatch):
    import ray
    from splitserve.worker_runtime import own_gpu_first
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [2])
    monkeypatch.setenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    own_gpu_first()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,0,1,3"
    monkeypatch.delenv("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    own_gpu_first()                            # Ray narrowed it: left alone
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_worker_env_passes_transport_and_multicast_switches(monkeypatch):
    from splitserve.deploy.ray_cluster import worker_env
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("UCX_TLS", "cuda_ipc,tcp")
    monkeypatch.setenv("SOMETHING_ELSE", "x")
    env = worker_env()
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["UCX_TLS"] == "cuda_ipc,tcp"
    assert "SOMETHING_ELSE" not in env and env["TOKENIZERS_PARALLELISM"] == "false"


def test_config_rejects_unknown_gpu_visibility():
    with pytest.raises(ValueError, match="gpu_visibility"):
        Config().replace("cluster", gpu_visibility="some")
    assert Config().replace("router", grpc_port=-1).router.grpc_port == -1
    with pytest.raises(ValueError, match="grpc_port"):
        Config().replace("router", grpc_port=-2)


def test_host_list_on_cpu_is_tolist():
    from splitserve.engine.sampler import host_list
    t = torch.tensor([3, 1, 2])
    assert host_list(t) == [3, 1, 2]
