"""Load a Llama-family model (architecture, weights, tokenizer) from GGUF, a Hugging Face safetensors
directory, or random dummy weights at a named shape.

Weights come out as a dict of Hugging Face parameter names -> torch tensors, so every source feeds
the same model code and the same equality tests against transformers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arch import ModelArch, dummy_arch
from .model_source import ModelError, ModelSource
from .tokenizer import TextTokenizer, bpe_from_gguf_fields, byte_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    arch: ModelArch
    weights: dict[str, torch.Tensor]
    tokenizer: TextTokenizer


def load(src: ModelSource, dtype: str = "float32", device: str = "cpu", seed: int = 0,
         cache_dir: Path | None = None) -> LoadedModel:
    tdt = _DTYPES[dtype]
    if src.kind == "gguf":
        return load_gguf(src.path, tdt, device, cache_dir)
    if src.kind == "safetensors":
        return load_safetensors(src.path, tdt, device)
    return load_dummy(src.shape, tdt, device, seed)


def load_tokenizer(src: ModelSource) -> TextTokenizer:
    """Only the tokenizer (the router tokenizes; it holds no weights)."""
    if src.kind == "gguf":
        import gguf
        reader = gguf.GGUFReader(str(src.path))
        names = {t.name for t in reader.tensors}
        arch = _gguf_arch(reader, src.path, "output.weight" in names, "blk.0.attn_q.bias" in names)
        return _gguf_tokenizer(reader, src.path, arch)
    if src.kind == "safetensors":
        return _hf_tokenizer(src.path, _hf_arch(src.path))
    arch = dummy_arch(src.shape)
    return byte_tokenizer(arch.vocab_size, arch.eos_token_ids)


# ---------------------------------------------------------------- GGUF
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                      "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    return None


def unpermute_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's rotate_half halves)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _gguf_arch(reader, path: Path, has_output: bool, has_bias: bool) -> ModelArch:
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        raise ModelError(f"{path}: unsupported architecture {arch!r} (supported: llama, qwen2, mistral)")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads = int(g("attention.head_count"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelArch(
        hidden_size=int(g("embedding_length")), num_layers=int(g("block_count")), num_heads=n_heads,
        num_kv_heads=int(g("attention.head_count_kv", n_heads)),
        intermediate_size=int(g("feed_forward_length")),
        vocab_size=len(_field(reader, "tokenizer.ggml.tokens")),
        head_dim=int(g("attention.key_length", 0) or 0),
        rope_theta=float(g("rope.freq_base", 10000.0)), rms_norm_eps=float(g("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=not has_output, qkv_bias=has_bias,
        max_position_embeddings=int(g("context_length", 4096)),
        bos_token_id=None if bos is None else int(bos), eos_token_ids=() if eos is None else (int(eos),),
        name=str(_field(reader, "general.name", path.stem)))


def load_gguf(path: Path, dtype: torch.dtype, device: str, cache_dir: Path | None = None) -> LoadedModel:
    """Read a GGUF file. Dequantized weights are cached as safetensors under cache_dir, so only
    the first load pays for the conversion."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises assorted errors on bad files
        raise ModelError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    names = {t.name for t in reader.tensors}
    arch = _gguf_arch(reader, path, "output.weight" in names, "blk.0.attn_q.bias" in names)
    tokenizer = _gguf_tokenizer(reader, path, arch)
    converted = _converted_path(path, cache_dir)
    if converted is not None and converted.is_file():
        from safetensors.torch import load_file
        weights = {k: v.to(device=device, dtype=dtype) for k, v in load_file(str(converted)).items()}
    else:
        weights = _dequantize_gguf(reader, path, arch)
        if converted is not None:
            _save_converted(weights, converted)
        weights = {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}
    _check_complete(weights, arch, path)
    return LoadedModel(arch, weights, tokenizer)


def _converted_path(path: Path, cache_dir: Path | None) -> Path | None:
    if cache_dir is None:
        return None
    st = path.stat()
    return cache_dir / "converted" / f"{path.stem}-{st.st_size}-{int(st.st_mtime)}.safetensors"


def _save_converted(weights: dict[str, torch.Tensor], target: Path) -> None:
    from safetensors.torch import save_file
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.part")   # workers may convert at once
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(target)


def _dequantize_gguf(reader, path: Path, arch: ModelArch) -> dict[str, torch.Tensor]:
    import gguf
    from tqdm import tqdm
    weights: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"converting {path.name}", unit="tensor", leave=False):
        hf = _hf_name(t.name)
        if hf is None:
            if t.name.startswith("rope_freqs"):
                raise ModelError(f"{path}: tensor {t.name} (rope frequency factors) is not supported")
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ModelError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}") from exc
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(reversed([int(d) for d in t.shape])))
        if hf.endswith("q_proj.weight") or hf.endswith("q_proj.bias"):
            arr = unpermute_rope(arr, arch.num_heads)
        elif hf.endswith("k_proj.weight") or hf.endswith("k_proj.bias"):
            arr = unpermute_rope(arr, arch.num_kv_heads)
        weights[hf] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    return weights


def _gguf_tokenizer(reader, path: Path, arch: ModelArch) -> TextTokenizer:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelError(f"{path}: unsupported tokenizer model {model!r} (supported: gpt2 byte-level BPE)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    tk, specials = bpe_from_gguf_fields(
        tokens, list(_field(reader, "tokenizer.ggml.merges")),
        [int(x) for x in _field(reader, "tokenizer.ggml.token_type")],
        str(_field(reader, "tokenizer.ggml.pre", "gpt2")))
    return TextTokenizer(tk, eos_token_ids=arch.eos_token_ids, bos_token_id=arch.bos_token_id,
                         add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                         chat_template=_field(reader, "tokenizer.chat_template"), special_ids=specials)


def _check_complete(weights: dict[str, torch.Tensor], arch: ModelArch, where: Path | str) -> None:
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    if not arch.tie_word_embeddings:
        need.append("lm_head.weight")
    for i in range(arch.num_layers):
        need += [f"model.layers.{i}.{n}" for n in _GGUF_LAYER_NAMES.values() if not n.endswith("bias")]
    missing = [n for n in need if n not in weights]
    if missing:
        raise ModelError(f"{where}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")


# ---------------------------------------------------------------- safetensors
_HF_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def _hf_arch(path: Path) -> ModelArch:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path / 'config.json'}: invalid JSON ({exc})") from exc
    archs = cfg.get("architectures") or []
    if not any(a in _HF_ARCHS for a in archs):
        raise ModelError(f"{path / 'config.json'}: unsupported architectures {archs} (supported: {_HF_ARCHS})")
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    n_heads = cfg["num_attention_heads"]
    return ModelArch(
        hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"], num_heads=n_heads,
        num_kv_heads=cfg.get("num_key_value_heads", n_heads), intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"], head_dim=cfg.get("head_dim") or 0,
        rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rope_scaling=cfg.get("rope_scaling"), rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias="Qwen2ForCausalLM" in archs or bool(cfg.get("attention_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids, name=path.name)


def load_safetensors(path: Path, dtype: torch.dtype, device: str) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    arch = _hf_arch(path)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        try:
            part = load_file(str(f), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{f}: corrupt safetensors file ({exc})") from exc
        weights.update({k: v.to(device=device, dtype=dtype) for k, v in part.items()})
    if "lm_head.weight" in weights and arch.tie_word_embeddings:
        del weights["lm_head.weight"]
    _check_complete(weights, arch, path)
    return LoadedModel(arch, weights, _hf_tokenizer(path, arch))


def _hf_tokenizer(path: Path, arch: ModelArch) -> TextTokenizer:
    from tokenizers import Tokenizer
    tj = path / "tokenizer.json"
    if not tj.is_file():
        raise ModelError(f"{path}: no tokenizer.json")
    tk = Tokenizer.from_file(str(tj))
    tcfg_path = path / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    template = tcfg.get("chat_template")
    jinja = path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    specials = frozenset(i for i, tok in tk.get_added_tokens_decoder().items() if tok.special)
    return TextTokenizer(tk, eos_token_ids=arch.eos_token_ids, bos_token_id=arch.bos_token_id,
                         add_bos=bool(tcfg.get("add_bos_token", False)), chat_template=template,
                         special_ids=specials)


# ---------------------------------------------------------------- dummy
def dummy_weights(arch: ModelArch, dtype: torch.dtype, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Random weights at the real shapes (like vLLM's --load-format dummy), generated on `device`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    h, qs, kvs, i = arch.hidden_size, arch.q_size, arch.kv_size, arch.intermediate_size

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)

    w = {"model.embed_tokens.weight": rnd(arch.vocab_size, h, std=1.0),
         "model.norm.weight": torch.ones(h, dtype=dtype, device=device)}
    if not arch.tie_word_embeddings:
        w["lm_head.weight"] = rnd(arch.vocab_size, h)
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        w[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
        w[p + "self_attn.q_proj.weight"] = rnd(qs, h)
        w[p + "self_attn.k_proj.weight"] = rnd(kvs, h)
        w[p + "self_attn.v_proj.weight"] = rnd(kvs, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, qs)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
        if arch.qkv_bias:
            for n, size in (("q", qs), ("k", kvs), ("v", kvs)):
                w[p + f"self_attn.{n}_proj.bias"] = rnd(size)
    return w


def load_dummy(shape: str, dtype: torch.dtype, device: str, seed: int) -> LoadedModel:
    try:
        arch = dummy_arch(shape)
    except ValueError as exc:
        raise ModelError(f"dummy:{shape}: {exc}") from exc
    return LoadedModel(arch, dummy_weights(arch, dtype, device, seed),
                       byte_tokenizer(arch.vocab_size, arch.eos_token_ids))
