"""The kernel wrappers refuse bad arguments with a ValueError that names the problem."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402

from splitserve.kernels.testing import make_paged_case, setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

from splitserve.kernels import (FP8_DTYPE, paged_decode_attention,  # noqa: E402
                                paged_extend_attention, write_kv)


@pytest.fixture
def case():
    return make_paged_case([5, 20], [1, 1], 4, 2, 64, 16, torch.bfloat16, torch.bfloat16,
                           device=DEVICE, seed=0)


@pytest.fixture
def fp8_case():
    return make_paged_case([5, 20], [1, 1], 4, 2, 64, 16, torch.bfloat16, FP8_DTYPE,
                           device=DEVICE, seed=0)


def decode(c, **over):
    args = dict(q=c.q, k_cache=c.k_cache, v_cache=c.v_cache, block_tables=c.block_tables,
                seq_lens=c.seq_lens, scale=c.scale, k_scale=c.k_scale, v_scale=c.v_scale)
    args.update(over)
    return paged_decode_attention(**args)


def extend(c, **over):
    args = dict(q=c.q, k_cache=c.k_cache, v_cache=c.v_cache,
                query_start_loc=c.query_start_loc, seq_lens=c.seq_lens,
                block_tables=c.block_tables, scale=c.scale, k_scale=c.k_scale,
                v_scale=c.v_scale)
    args.update(over)
    return paged_extend_attention(**args)


@pytest.mark.parametrize("call", [decode, extend])
def test_fp8_cache_without_scales_is_refused(fp8_case, call):
    with pytest.raises(ValueError, match="FP8.*no k_scale"):
        call(fp8_case, k_scale=None)
    with pytest.raises(ValueError, match="FP8.*no v_scale"):
        call(fp8_case, v_scale=None)


@pytest.mark.parametrize("call", [decode, extend])
def test_scales_for_a_bf16_cache_are_refused(case, call):
    with pytest.raises(ValueError, match="k_scale was given but the cache is torch.bfloat16"):
        call(case, k_scale=torch.ones(2, device=DEVICE))


def test_bad_scale_shape_and_dtype(fp8_case):
    with pytest.raises(ValueError, match=r"k_scale must be float32 \[num_kv_heads=2\]"):
        decode(fp8_case, k_scale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="v_scale must be float32"):
        decode(fp8_case, v_scale=torch.ones(2, dtype=torch.float16, device=DEVICE))


@pytest.mark.parametrize("call", [decode, extend])
def test_bad_q_dtype_and_shape(case, call):
    with pytest.raises(ValueError, match="q has dtype torch.float32"):
        call(case, q=case.q.float())
    with pytest.raises(ValueError, match="q must be 3-D"):
        call(case, q=case.q.flatten(1))
    with pytest.raises(ValueError, match="q is torch.float16 but the cache is torch.bfloat16"):
        call(case, q=case.q.half())
    with pytest.raises(ValueError, match="q head_dim 32 != cache head_dim 64"):
        call(case, q=case.q[..., :32].contiguous())
    with pytest.raises(ValueError, match="num_q_heads 3 is not a multiple of num_kv_heads 2"):
        call(case, q=case.q[:, :3].contiguous())
    with pytest.raises(ValueError, match=r"q must be contiguous in its last dim"):
        call(case, q=case.q.transpose(1, 2).contiguous().transpose(1, 2))


@pytest.mark.parametrize("call", [decode, extend])
def test_bad_metadata(case, call):
    with pytest.raises(ValueError, match="block_tables must be int32"):
        call(case, block_tables=case.block_tables.long())
    with pytest.raises(ValueError, match="seq_lens must be int32"):
        call(case, seq_lens=case.seq_lens.long())
    with pytest.raises(ValueError, match="seq_lens has 1 entries, expected num_seqs=2"):
        call(case, seq_lens=case.seq_lens[:1])


def test_bad_cache(case):
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        decode(case, k_cache=case.k_cache.flatten(0, 1))
    with pytest.raises(ValueError, match="k_cache is torch.bfloat16 but v_cache is torch.float16"):
        decode(case, v_cache=case.v_cache.half())
    with pytest.raises(ValueError, match="k_cache has dtype torch.float32"):
        decode(case, k_cache=case.k_cache.float(), v_cache=case.v_cache.float())
    with pytest.raises(ValueError, match="block_size 12 must be a power of two"):
        decode(case, k_cache=case.k_cache[:, :12], v_cache=case.v_cache[:, :12])
    # V pages neither head_dim-contiguous nor token-minor (head and d swapped)
    odd = case.v_cache.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="token-minor within a page"):
        decode(case, v_cache=odd)


def test_bad_out_and_scratch(case):
    with pytest.raises(ValueError, match="out must be torch.bfloat16"):
        decode(case, out=torch.empty_like(case.q, dtype=torch.float16))
    with pytest.raises(ValueError, match="out must be"):
        extend(case, out=case.q[:1].clone())
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        decode(case, num_splits=0)


def test_cpu_tensors_need_the_interpreter(case, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cpu = make_paged_case([5], [1], 2, 2, 64, 16, torch.bfloat16, torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="q is on the CPU"):
        decode(cpu)


def test_write_kv_errors(case, fp8_case):
    k = torch.randn(3, 2, 64, device=DEVICE).to(torch.bfloat16)
    slots = torch.tensor([0, 1, -1], device=DEVICE)
    with pytest.raises(ValueError, match="FP8.*no k_scale"):
        write_kv(k, k, fp8_case.k_cache, fp8_case.v_cache, slots, None, fp8_case.v_scale)
    with pytest.raises(ValueError, match="slot_mapping must be int64"):
        write_kv(k, k, case.k_cache, case.v_cache, slots.int())
    with pytest.raises(ValueError, match=r"k has shape \(3, 2, 32\), expected"):
        write_kv(k[..., :32], k[..., :32], case.k_cache, case.v_cache, slots)
    with pytest.raises(ValueError, match="slot_mapping has 2 entries but k has 3 tokens"):
        write_kv(k, k, case.k_cache, case.v_cache, slots[:2])
    with pytest.raises(ValueError, match="k has dtype torch.float32"):
        write_kv(k.float(), k.float(), case.k_cache, case.v_cache, slots)
    with pytest.raises(ValueError, match="k is torch.float16 but the cache is torch.bfloat16"):
        write_kv(k.half(), k.half(), case.k_cache, case.v_cache, slots)


def test_pdl_only_on_cuda_and_switchable(monkeypatch):
    """Programmatic dependent launch: never on CPU or under the interpreter, off by env; the
    successor's launch triggered late for one row and early for more unless the env says."""
    from splitserve.kernels._pdl import EARLY, LATE, launch_kwargs, trigger_mode, use_pdl
    assert not use_pdl(torch.device("cpu"))
    assert launch_kwargs(torch.device("cpu"), 1) == {"PDL": 0}
    monkeypatch.delenv("SPLITSERVE_PDL_TRIGGER", raising=False)
    assert (trigger_mode(1), trigger_mode(2)) == (LATE, EARLY)
    monkeypatch.setenv("SPLITSERVE_PDL_TRIGGER", "late")
    assert trigger_mode(8) == LATE
    monkeypatch.setenv("SPLITSERVE_PDL_TRIGGER", "early")
    assert trigger_mode(1) == EARLY
    monkeypatch.setenv("SPLITSERVE_PDL_TRIGGER", "soon")
    with pytest.raises(ValueError, match="early, late or auto"):
        trigger_mode(1)
    monkeypatch.setenv("SPLITSERVE_PDL", "0")
    assert not use_pdl(torch.device("cuda"))
