"""Cost model: least-squares fit recovers known coefficients; profiles load; predictions behave."""
from __future__ import annotations

import random

import pytest

from splitserve.router.cost_model import (CostModel, DecodeSample, PrefillSample, TransferSample, fit,
                                          load_profile)


def test_fit_recovers_known_coefficients():
    rng = random.Random(0)
    pf, pt, pp = 4e-3, 40e-6, 1.5e-9
    df, ds, dk = 4e-3, 15e-6, 3e-8
    lat, bw = 1e-3, 1e11
    noise = lambda: 1 + rng.uniform(-0.01, 0.01)  # noqa: E731
    samples = []
    for n in (128, 512, 2048, 4096, 8192):
        for c in (0, 4096):
            t = pf + pt * n + pp * CostModel.pairs(n, c)
            samples.append(PrefillSample(((n, c),), t * noise()))
    for b in (1, 8, 32, 128):
        for k in (1000, 100_000, 500_000):
            samples.append(DecodeSample(b, k, (df + ds * b + dk * k) * noise()))
    for nbytes in (1 << 20, 1 << 26, 1 << 30):
        samples.append(TransferSample(nbytes, (lat + nbytes / bw) * noise()))
    res = fit(samples)
    assert res.prefill.per_token_s == pytest.approx(pt, rel=0.05)
    assert res.prefill.per_pair_s == pytest.approx(pp, rel=0.1)
    assert res.decode.per_kv_token_s == pytest.approx(dk, rel=0.05)
    assert res.decode.fixed_s == pytest.approx(df, rel=0.1)
    assert res.transfer.bandwidth_Bps == pytest.approx(bw, rel=0.05)
    assert all(e < 0.02 for e in res.rel_rmse.values())


def test_fit_never_returns_negative_coefficients():
    samples = [DecodeSample(b, 0, 0.01) for b in (1, 2, 4, 8)]  # flat: per-seq and per-kv are 0
    dc = fit(samples).decode
    assert min(dc.fixed_s, dc.per_seq_s, dc.per_kv_token_s) >= 0
    assert dc.fixed_s == pytest.approx(0.01, rel=1e-6)


def test_h200_profile_matches_the_measured_ceilings():
    m = load_profile("h200-llama3-8b")
    assert m.kv_bytes_per_token == 32 * 2 * 8 * 128 * 2
    assert 3.7e-3 < m.decode_step_time(1, 0) < 4.3e-3            # weights / ~4.2 TB/s
    assert "not profiled end-to-end" in m.notes.lower()
    assert m.predict_ttft(8000, cached_tokens=6000) < m.predict_ttft(8000)
    assert m.predict_ttft(8000, transfer_tokens=8000, bandwidth_Bps=1e9) > m.predict_ttft(8000) + 1.0
    assert m.predict_tpot(64, 64 * 4096) > m.predict_tpot(1, 4096)


def test_cpu_profile_loads_and_unknown_profile_errors():
    assert load_profile("cpu-smollm2").decode.fixed_s > 0
    with pytest.raises(FileNotFoundError, match="known"):
        load_profile("no-such-profile")


def test_round_trip(tmp_path):
    m = load_profile("h200-llama3-8b")
    m.save(tmp_path / "x.json")
    assert load_profile(tmp_path / "x.json") == m


def test_prefill_floor_bounds_forwards_and_mixed_steps():
    from splitserve.router.cost_model import CostModel, DecodeCoeffs, PrefillCoeffs, TransferCoeffs
    m = CostModel("t", PrefillCoeffs(0.0, 2e-5, 1e-9, floor_s=0.02), DecodeCoeffs(0.005, 1e-5, 5e-8),
                  TransferCoeffs(0.001, 1e11), 131072, 10**6, prefill_chunk_tokens=2048)
    assert m.prefill_forward_time(64, CostModel.pairs(64)) == 0.02          # launch-bound
    big = m.prefill_forward_time(2048, CostModel.pairs(2048))
    assert big == pytest.approx(2048 * 2e-5 + CostModel.pairs(2048) * 1e-9)
    # a chunked prompt: one floor-bounded forward per chunk (the last, 1 token, costs the floor)
    assert m.prefill_time(4097) == pytest.approx(
        m.prefill_forward_time(2048, CostModel.pairs(2048)) + m.prefill_forward_time(2048, CostModel.pairs(2048, 2048))
        + 0.02)
    # a decode step carrying a small chunk runs eagerly: the floor, not graph speed
    assert m.mixed_step_time(8, 8000, 16, CostModel.pairs(16)) == 0.02
    assert m.mixed_step_time(8, 8000, 0, 0) == m.decode_step_time(8, 8000)


def test_fit_prefill_floor_recovers_the_model():
    from splitserve.router.cost_model import CostModel, PrefillSample, fit_prefill_floor
    truth = lambda n, c: max(0.0226, 2.4e-5 * n + 1.6e-9 * CostModel.pairs(n, c))  # noqa: E731
    pts = [(64, 0), (256, 0), (1024, 0), (2048, 0), (2048, 4096), (2048, 8192), (2048, 14336), (512, 4096)]
    pc, err = fit_prefill_floor([PrefillSample(((n, c),), truth(n, c)) for n, c in pts])
    assert pc.floor_s == pytest.approx(0.0226)
    assert pc.per_token_s == pytest.approx(2.4e-5, rel=1e-3) and pc.per_pair_s == pytest.approx(1.6e-9, rel=1e-3)
    assert err < 1e-6
