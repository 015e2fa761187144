"""Cost model of prefill, decode and KV transfer, fitted from measurements (plain Python, no torch).

Three linear models over a small feature set, each fitted by least squares (`fit`):

- prefill forward:  t = fixed + per_token * N + per_pair * P
    N = new (uncached) tokens computed in the forward, summed over the batch;
    P = attention (query, key) pairs, sum over sequences of n * (cached + (n + 1) / 2),
        the causal attention work of n new tokens after `cached` tokens of context.
- decode step:      t = fixed + per_seq * B + per_kv_token * K
    B = running sequences, K = KV tokens read (sum of their context lengths).
    A mixed step (decode + a chunk of local prefill, as colocated serving runs) costs the decode
    step plus the prefill model's per_token/per_pair terms for the chunk (one fixed cost).
- transfer:         t = latency + bytes / bandwidth   (bandwidth: the live value from kvtransfer
    when the caller has one, else the profile's).

The router's policy, admission control and the simulator all predict from the same object, so
a policy tuned in the simulator is the policy that runs. Profiles are JSON files in
`router/profiles/` (`load_profile(name)`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

PROFILE_DIR = Path(__file__).parent / "profiles"


@dataclass(frozen=True)
class PrefillCoeffs:
    fixed_s: float           # per forward (weights read once, launches)
    per_token_s: float       # GEMM work per new token
    per_pair_s: float        # attention work per causal (query, key) pair
    floor_s: float = 0.0     # the shortest a forward can be (eager launch overhead on a GPU: the
                             # CPU issuing ~30 kernels per layer); a forward costs max(floor, linear)


@dataclass(frozen=True)
class DecodeCoeffs:
    fixed_s: float           # per step (weights read once at small batch)
    per_seq_s: float         # per running sequence (activations, sampling)
    per_kv_token_s: float    # per context token whose KV the step reads


@dataclass(frozen=True)
class TransferCoeffs:
    latency_s: float         # per transfer (handshake, completion message)
    bandwidth_Bps: float     # bytes per second when no live bandwidth is given


@dataclass(frozen=True)
class CostModel:
    """Predicts forward, step and transfer times for one worker type and model shape."""
    name: str
    prefill: PrefillCoeffs
    decode: DecodeCoeffs
    transfer: TransferCoeffs
    kv_bytes_per_token: int
    kv_capacity_tokens: int          # KV tokens one worker holds
    prefill_chunk_tokens: int = 8192  # token budget of one prefill forward on a prefill worker
    notes: str = ""
    source: dict = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------ primitives
    @staticmethod
    def pairs(new_tokens: int, cached_tokens: int = 0) -> float:
        """Causal attention (query, key) pairs of `new_tokens` after `cached_tokens` of context."""
        return new_tokens * (cached_tokens + (new_tokens + 1) / 2)

    def prefill_forward_time(self, new_tokens: float, pairs: float) -> float:
        """One prefill forward computing `new_tokens` tokens with `pairs` attention pairs."""
        if new_tokens <= 0:
            return 0.0
        c = self.prefill
        return max(c.floor_s, c.fixed_s + c.per_token_s * new_tokens + c.per_pair_s * pairs)

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Time to prefill one request alone, chunked at `prefill_chunk_tokens` per forward."""
        if new_tokens <= 0:
            return 0.0
        # each chunk is one forward (its own fixed cost, at least the floor); the chunks' pairs
        # add up to pairs(new_tokens, cached_tokens)
        t, done, size = 0.0, 0, self.prefill_chunk_tokens
        while done < new_tokens:
            n = min(size, new_tokens - done)
            t += self.prefill_forward_time(n, self.pairs(n, cached_tokens + done))
            done += n
        return t

    def decode_step_time(self, batch: int, kv_tokens: float) -> float:
        """One decode step of `batch` sequences reading `kv_tokens` KV tokens (0 if batch is 0)."""
        if batch <= 0:
            return 0.0
        c = self.decode
        return c.fixed_s + c.per_seq_s * batch + c.per_kv_token_s * kv_tokens

    def mixed_step_time(self, batch: int, kv_tokens: float, chunk_tokens: int, chunk_pairs: float) -> float:
        """A decode step that also computes a chunk of local prefill (colocated / local prefill)."""
        if batch <= 0:
            return self.prefill_forward_time(chunk_tokens, chunk_pairs)
        t = self.decode_step_time(batch, kv_tokens)
        if chunk_tokens <= 0:
            return t
        # a step with prefill tokens runs eagerly (no CUDA graph): at least the prefill floor
        return max(self.prefill.floor_s, t + self.prefill.per_token_s * chunk_tokens
                   + self.prefill.per_pair_s * chunk_pairs)

    def transfer_time(self, tokens: int, bandwidth_Bps: float | None = None) -> float:
        """KV transfer of `tokens` tokens at the live bandwidth (or the profile's)."""
        if tokens <= 0:
            return 0.0
        bw = bandwidth_Bps or self.transfer.bandwidth_Bps
        return self.transfer.latency_s + tokens * self.kv_bytes_per_token / bw

    # ------------------------------------------------------------------ request-level predictions
    def predict_ttft(self, prompt_tokens: int, cached_tokens: int = 0, queue_s: float = 0.0,
                     transfer_tokens: int = 0, bandwidth_Bps: float | None = None) -> float:
        """TTFT of a request: queue wait + prefill of its uncached part + KV transfer (0 if local)."""
        new = max(prompt_tokens - cached_tokens, 1)  # a fully cached prompt recomputes its last token
        return (queue_s + self.prefill_time(new, prompt_tokens - new)
                + self.transfer_time(transfer_tokens, bandwidth_Bps))

    def predict_tpot(self, batch: int, kv_tokens: float, interference_tokens_per_step: float = 0.0) -> float:
        """Time per output token on a decode worker running `batch` sequences over `kv_tokens`.

        `interference_tokens_per_step`: average prefill tokens computed per step on the same worker
        (local prefills), each costing the prefill per-token rate.
        """
        return (self.decode_step_time(max(batch, 1), kv_tokens)
                + self.prefill.per_token_s * interference_tokens_per_step)

    def max_local_chunk(self, step_s: float, tpot_slo_s: float) -> int:
        """Largest prefill chunk a decode step of `step_s` can carry and still meet `tpot_slo_s`."""
        slack = tpot_slo_s - step_s
        return max(int(slack / self.prefill.per_token_s), 0) if slack > 0 else 0

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        return cls(name=d["name"], prefill=PrefillCoeffs(**d["prefill"]), decode=DecodeCoeffs(**d["decode"]),
                   transfer=TransferCoeffs(**d["transfer"]), kv_bytes_per_token=int(d["kv_bytes_per_token"]),
                   kv_capacity_tokens=int(d["kv_capacity_tokens"]),
                   prefill_chunk_tokens=int(d.get("prefill_chunk_tokens", 8192)),
                   notes=d.get("notes", ""), source=d.get("source", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def with_bandwidth(self, bandwidth_Bps: float, latency_s: float | None = None) -> "CostModel":
        lat = self.transfer.latency_s if latency_s is None else latency_s
        return replace(self, transfer=TransferCoeffs(lat, bandwidth_Bps))


def load_profile(name_or_path: str | Path) -> CostModel:
    """A profile by name (`h200-llama3-8b`, `cpu-smollm2`) or by path to its JSON file."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PROFILE_DIR / f"{name_or_path}.json"
    if not p.exists():
        known = sorted(q.stem for q in PROFILE_DIR.glob("*.json"))
        raise FileNotFoundError(f"cost profile {name_or_path!r} not found (known: {known})")
    return CostModel.from_dict(json.loads(p.read_text()))


# ---------------------------------------------------------------------- fitting
@dataclass(frozen=True)
class PrefillSample:
    """One measured prefill forward: per-sequence (new, cached) tokens and its time."""
    seqs: tuple[tuple[int, int], ...]
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    batch: int
    kv_tokens: int
    seconds: float


@dataclass(frozen=True)
class TransferSample:
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class FitResult:
    prefill: PrefillCoeffs | None
    decode: DecodeCoeffs | None
    transfer: TransferCoeffs | None
    rel_rmse: dict


def _nnls(rows: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Least squares with non-negative coefficients (drop a negative feature and refit)."""
    import numpy as np
    a, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    active = list(range(a.shape[1]))
    while True:
        # weight rows by 1/y so that short and long samples count alike (relative error)
        w = 1.0 / np.maximum(np.abs(b), 1e-12)
        sol, *_ = np.linalg.lstsq(a[:, active] * w[:, None], b * w, rcond=None)
        neg = [i for i, v in zip(active, sol) if v < 0]
        if not neg or len(active) == 1:
            coef = [0.0] * a.shape[1]
            for i, v in zip(active, sol):
                coef[i] = max(float(v), 0.0)
            return coef
        active.remove(min(neg, key=lambda i: sol[active.index(i)]))


def _rel_rmse(rows, y, coef) -> float:
    errs = [(sum(c * x for c, x in zip(coef, r)) - t) / t for r, t in zip(rows, y) if t > 0]
    return (sum(e * e for e in errs) / max(len(errs), 1)) ** 0.5


def fit(samples: Iterable[PrefillSample | DecodeSample | TransferSample]) -> FitResult:
    """Fit each model whose samples are present (at least as many samples as features)."""
    pre, dec, tra = [], [], []
    for s in samples:
        {PrefillSample: pre, DecodeSample: dec, TransferSample: tra}[type(s)].append(s)
    err: dict = {}
    pc = dc = tc = None
    if len(pre) >= 3:
        rows = [[1.0, sum(n for n, _ in s.seqs), sum(CostModel.pairs(n, c) for n, c in s.seqs)] for s in pre]
        coef = _nnls(rows, [s.seconds for s in pre])
        pc, err["prefill"] = PrefillCoeffs(*coef), _rel_rmse(rows, [s.seconds for s in pre], coef)
    if len(dec) >= 3:
        rows = [[1.0, s.batch, s.kv_tokens] for s in dec]
        coef = _nnls(rows, [s.seconds for s in dec])
        dc, err["decode"] = DecodeCoeffs(*coef), _rel_rmse(rows, [s.seconds for s in dec], coef)
    if len(tra) >= 2:
        rows = [[1.0, s.nbytes] for s in tra]
        lat, inv_bw = _nnls(rows, [s.seconds for s in tra])
        tc = TransferCoeffs(lat, 1.0 / inv_bw if inv_bw > 0 else float("inf"))
        err["transfer"] = _rel_rmse(rows, [s.seconds for s in tra], [lat, inv_bw])
    return FitResult(pc, dc, tc, err)


def fit_prefill_floor(samples: Sequence[PrefillSample], margin: float = 1.05) -> tuple[PrefillCoeffs, float]:
    """Prefill as max(floor, per_token * N + per_pair * P): the floor is the fastest sample (a GPU's
    eager forward is bound by the CPU issuing kernels until the work outgrows it), the linear part
    is fitted (no fixed term: the weight read hides under the floor) on the samples above
    `margin` x floor. Returns the coefficients and the relative RMSE over all samples."""
    floor = min(s.seconds for s in samples)
    above = [s for s in samples if s.seconds > margin * floor]
    if len(above) < 2:
        raise ValueError("fit_prefill_floor: need at least 2 samples above the floor")
    feats = lambda s: [sum(n for n, _ in s.seqs), sum(CostModel.pairs(n, c) for n, c in s.seqs)]  # noqa: E731
    per_token, per_pair = _nnls([feats(s) for s in above], [s.seconds for s in above])
    pc = PrefillCoeffs(0.0, per_token, per_pair, floor)
    errs = [(max(floor, per_token * x[0] + per_pair * x[1]) - s.seconds) / s.seconds
            for s, x in ((s, feats(s)) for s in samples)]
    return pc, (sum(e * e for e in errs) / len(errs)) ** 0.5
