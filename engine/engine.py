"""LLMEngine: the model runtime's public face.

    engine = LLMEngine.from_config(config)
    rid = engine.add_request("Hello", SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...          # streamed deltas, every step
    engine.generate(["a", "b"], params)       # or run a batch to completion

Each step: scheduler.schedule() -> runner.execute() -> scheduler.update_from_output() -> detokenize,
stop strings -> RequestOutput deltas. With scheduler.overlap_decode, greedy decode steps overlap:
the next step is launched before the previous one's tokens are read (engine/overlap.py), and a
step() returns the deltas of the step it read.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import Config
from ..kernels.reference import FP8_DTYPE
from .attention import KVCache, TorchPagedAttention
from .attention_triton import TritonPagedAttention
from .block_pool import BlockPool
from .cuda_graph import DecodeGraphRunner, decode_buckets
from .loader import LoadedModel, load
from .model import LlamaModel
from .model_runner import ModelRunner
from .model_source import default_cache_dir, resolve
from .overlap import StepPipeline
from .detokenizer import IncrementalDetokenizer
from .request import FinishReason, Request, SamplingParams, find_stop, validate_prompt
from .sampler import Sampler
from .scheduler import Scheduler

log = logging.getLogger("splitserve.engine")

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "fp8_e4m3": FP8_DTYPE}


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]                  # all generated so far
    text: str                             # all generated text so far (stop string removed)
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_cached_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Track:
    request: Request
    arrival: float
    detok: IncrementalDetokenizer
    first_token_time: float | None = None
    sent_tokens: int = 0
    sent_text: str = ""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("config model.device is 'cuda' but no CUDA device is available")
    return torch.device(device)


class LLMEngine:
    def __init__(self, config: Config, loaded: LoadedModel, device: torch.device, attention: str = "auto"):
        """attention: 'auto' (Triton kernels + CUDA graphs on CUDA, torch on CPU), 'torch', or
        'triton' (the GPU path; on CPU it runs under TRITON_INTERPRET=1 without graphs, for tests)."""
        if attention not in ("auto", "torch", "triton"):
            raise ValueError(f"attention must be auto, torch or triton, got {attention!r}")
        self.config = config
        self.arch = loaded.arch
        self.tokenizer = loaded.tokenizer
        self.device = device
        self.max_model_len = config.scheduler.max_model_len or loaded.arch.max_position_embeddings
        cc = config.cache
        use_triton = attention == "triton" or (attention == "auto" and device.type == "cuda")
        # the GPU path also fuses the layer glue (Triton); the CPU path stays plain torch
        self.model = LlamaModel(loaded.arch, loaded.weights, fused=use_triton, max_positions=self.max_model_len)
        buckets = decode_buckets(config.scheduler.max_num_seqs) if use_triton else ()
        kv_dtype = self.model.dtype if cc.kv_dtype == "auto" else _TORCH_DTYPES[cc.kv_dtype]
        num_blocks = cc.num_blocks or self._auto_num_blocks(kv_dtype, max(buckets, default=1))
        self.kv_cache = KVCache(self.arch.num_layers, num_blocks, cc.tokens_per_block, self.arch.num_kv_heads,
                                self.arch.head_dim, kv_dtype, device)
        self._log_kv_cache(kv_dtype)
        self.pool = BlockPool(num_blocks, cc.tokens_per_block, cc.hash_seed, cc.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.pool, self.max_model_len)
        scale = self.arch.head_dim ** -0.5
        graphs = None
        if use_triton:
            attn = TritonPagedAttention(self.kv_cache, scale, self.arch.num_heads)
            width = -(-self.max_model_len // cc.tokens_per_block)
            graphs = DecodeGraphRunner(self.model, attn, width, buckets, use_graphs=device.type == "cuda")
            t0 = time.perf_counter()
            graphs.capture()
            self.graph_capture_s = time.perf_counter() - t0
        else:
            attn = TorchPagedAttention(self.kv_cache, scale)
        self.sampler = Sampler(device)
        self.runner = ModelRunner(self.model, attn, self.sampler, cc.tokens_per_block, graphs)
        self.pipeline = StepPipeline(self.scheduler, self.runner, config.scheduler.overlap_decode)
        # step_hook(sched) -> after_layer(i) | None: lets a prefill worker stream each layer's KV
        # out while the step's later layers still run (see PrefillWorker)
        self.step_hook = None
        self._tracks: dict[str, _Track] = {}
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: Config, attention: str = "auto") -> "LLMEngine":
        mc = config.model
        device = resolve_device(mc.device)
        loaded = load(resolve(mc.model, mc.cache_dir), mc.dtype, str(device), mc.seed,
                      default_cache_dir(mc.cache_dir))
        return cls(config, loaded, device, attention)

    def _auto_num_blocks(self, kv_dtype: torch.dtype, max_decode_batch: int) -> int:
        """CUDA: fraction of the memory free after weights, less the activations' peak (measured
        by one forward of the largest step); CPU: cache.cpu_cache_gib."""
        a, cc = self.arch, self.config.cache
        per_block = KVCache.bytes_per_block(a.num_layers, cc.tokens_per_block, a.num_kv_heads, a.head_dim, kv_dtype)
        self.memory_report: dict[str, float] = {}
        if self.device.type == "cuda":
            activations = self._profile_activations(max_decode_batch)
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free * cc.memory_fraction) - activations
            self.memory_report = {"free_after_weights_gib": free / 2**30, "total_gib": total / 2**30,
                                  "activations_gib": activations / 2**30,
                                  "weights_gib": torch.cuda.memory_allocated(self.device) / 2**30}
        else:
            budget = int(cc.cpu_cache_gib * (1 << 30))
        return max(1, budget // per_block)

    @torch.inference_mode()
    def _profile_activations(self, max_decode_batch: int) -> int:
        """Peak bytes of one forward over the largest step (attention replaced by identity)."""
        class _Identity:
            def forward(self, layer, q, k, v):
                return q
        sc = self.config.scheduler
        t = max(sc.max_num_batched_tokens, max_decode_batch)
        ids = torch.zeros(t, dtype=torch.long, device=self.device)
        rows = torch.arange(min(t, max(sc.max_num_seqs, max_decode_batch)), device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.model.forward(ids, ids, _Identity(), rows)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        torch.cuda.empty_cache()
        return int(peak * 1.2) + (256 << 20)   # + cuBLAS workspaces, graph pool slack

    def _log_kv_cache(self, kv_dtype: torch.dtype) -> None:
        c = self.kv_cache
        nbytes = c.kv.numel() * c.kv.element_size()
        self.kv_report = {"num_blocks": c.num_blocks, "block_size": c.block_size,
                          "num_tokens": c.num_blocks * c.block_size, "gib": nbytes / 2**30,
                          "dtype": str(kv_dtype).replace("torch.", ""), **getattr(self, "memory_report", {})}
        log.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB %s (device %s)",
                 c.num_blocks, c.block_size, c.num_blocks * c.block_size, nbytes / 2**30,
                 self.kv_report["dtype"], self.device)

    # ------------------------------------------------------------ requests
    def add_request(self, prompt: str | Sequence[int] | None = None, params: SamplingParams | None = None,
                    request_id: str | None = None, messages: list[dict] | None = None,
                    hold_blocks: bool = False) -> str:
        """Queue a request (text, token ids, or chat messages); returns its id.

        hold_blocks: keep the KV blocks when the request finishes (a prefill worker pushes them,
        then calls release_held)."""
        req = self._new_request(prompt, params, request_id, messages)
        req.hold_blocks = hold_blocks
        self.scheduler.add_request(req)
        self._tracks[req.request_id] = self._track(req)
        return req.request_id

    def _new_request(self, prompt, params, request_id, messages) -> Request:
        params = params or SamplingParams()
        if messages is not None:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if prompt is None:
            raise ValueError("a request needs a prompt (text or token ids) or chat messages")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        validate_prompt(ids, self.arch.vocab_size, self.max_model_len)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        return Request(rid, ids, params, eos_token_ids=self.tokenizer.eos_token_ids, arrival_time=time.monotonic())

    # ------------------------------------------------------------ disaggregation
    def reserve_remote(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                       request_id: str) -> tuple[list[int], int] | None:
        """Decode side: reserve blocks for a prompt whose KV another worker computes.

        Returns (block ids to fill, number of leading prompt tokens already cached here), or
        None when the pool has no room now."""
        req = self._new_request(list(prompt_token_ids), params, request_id, None)
        limit = min(req.num_prompt_tokens + params.max_tokens, self.max_model_len)
        if -(-limit // self.pool.block_size) > self.pool.num_blocks:
            raise ValueError(f"request {request_id}: needs more KV blocks than the pool holds")
        # the transfer agent fills these blocks on its own CUDA streams: a block freed by a request
        # that still has a row in the step in flight must not be written before that step is done
        self.pipeline.wait_device()
        ids = self.scheduler.reserve_remote(req)
        if ids is None:
            return None
        self._tracks[request_id] = self._track(req)
        return ids, req.num_cached_tokens

    def _track(self, req: Request) -> _Track:
        return _Track(req, req.arrival_time, IncrementalDetokenizer(self.tokenizer))

    def commit_remote(self, request_id: str, first_token: int) -> RequestOutput | None:
        """Decode side: the prompt's KV arrived and was verified; decode from the first token.

        Returns the request's output when the first token already finished it (eos, max_tokens 1),
        and None for a request aborted meanwhile (the router streams the first token before the
        commit, so a stop string in it can abort first)."""
        if request_id not in self.scheduler.transferring:
            return None
        req = self.scheduler.commit_remote(request_id, first_token)
        tr = self._tracks[request_id]
        tr.first_token_time = time.monotonic()
        return self._emit(tr, tr.first_token_time) if req.is_finished else None

    def held_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.scheduler.held[request_id].blocks]

    def release_held(self, request_id: str) -> None:
        self.scheduler.release_held(request_id)

    def abort(self, request_id: str) -> bool:
        req = self.scheduler.abort_request(request_id)
        self._tracks.pop(request_id, None)
        self.sampler.release(request_id)
        return req is not None

    def has_unfinished(self) -> bool:
        """Requests to run, or a launched step whose tokens are still to be read."""
        return self.scheduler.has_unfinished or self.pipeline.in_flight is not None

    # ------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        done = self.pipeline.step(self.step_hook)
        if done is None:
            return []
        updated = self.scheduler.update_from_output(*done)
        now = time.monotonic()
        return [self._emit(self._tracks[r.request_id], now) for r in updated if r.request_id in self._tracks]

    def _emit(self, tr: _Track, now: float) -> RequestOutput:
        req = tr.request
        if tr.first_token_time is None:
            tr.first_token_time = now
        tr.detok.update(req.output_token_ids)     # stable text: an incomplete UTF-8 tail is held back
        text = tr.detok.final_text() if req.is_finished else tr.detok.text
        stop_at = find_stop(text, req.params.stop, len(tr.sent_text))
        if stop_at is not None and not req.is_finished:
            self.scheduler.finish_request(req, FinishReason.STOP)
        if stop_at is not None:
            text = text[:stop_at]
        out = RequestOutput(
            req.request_id, req.prompt_token_ids, list(req.output_token_ids), text,
            req.output_token_ids[tr.sent_tokens:], text[len(tr.sent_text):], req.is_finished,
            req.finish_reason.value if req.finish_reason else None, req.num_cached_tokens)
        tr.sent_tokens, tr.sent_text = len(req.output_token_ids), text
        if req.is_finished:
            n = len(req.output_token_ids)
            out.timings = {"ttft_s": tr.first_token_time - tr.arrival, "e2e_s": now - tr.arrival,
                           "tpot_s": (now - tr.first_token_time) / max(n - 1, 1)}
            del self._tracks[req.request_id]
            self.sampler.release(req.request_id)
        return out

    def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 | None = None) -> list[RequestOutput]:
        """Run prompts as one continuous batch to completion; outputs in prompt order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]
