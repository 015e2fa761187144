"""kernels/l2_prefetch.py: the side-stream L2 read must read every word of the tensor (its
per-program XORs fold to the numpy XOR of all words) for any size and dtype."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any kernel module is imported

import pytest  # noqa: E402

from splitserve.kernels.testing import setup_kernel_tests  # noqa: E402

DEVICE = setup_kernel_tests()

from splitserve.kernels.l2_prefetch import BLOCK, l2_prefetch, xor_words_ref  # noqa: E402


def _fold(parts: torch.Tensor) -> int:
    out = 0
    for v in parts.cpu().tolist():
        out ^= v
    return out


@pytest.mark.parametrize("shape,dtype,programs", [((64, 96), torch.bfloat16, 4), ((3 * BLOCK + 7,), torch.int32, 3),
                                                  ((5, 4099), torch.float32, 8), ((2,), torch.float16, 4)])
def test_prefetch_reads_every_word(shape, dtype, programs):
    gen = torch.Generator().manual_seed(sum(shape))
    t = (torch.randn(*shape, generator=gen) * 100).to(dtype)
    parts = l2_prefetch(t.to(DEVICE), programs=programs)
    assert parts.dtype == torch.int32 and 1 <= parts.numel() <= programs
    assert _fold(parts) == xor_words_ref(t) != 0


def test_prefetch_refuses_bad_input():
    with pytest.raises(ValueError, match="contiguous"):
        l2_prefetch(torch.zeros(8, 8, device=DEVICE).t())
    with pytest.raises(ValueError, match="multiple of 4"):
        l2_prefetch(torch.zeros(3, dtype=torch.bfloat16, device=DEVICE))
