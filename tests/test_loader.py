"""Model loading: GGUF (the embedded SmolLM2), HF safetensors directories (Llama, Qwen2-style bias),
dummy shapes, and one clear error for each way a model can be missing, corrupt or unsupported."""
from __future__ import annotations

import json

import pytest
import torch

from splitserve.engine.arch import SHAPES
from splitserve.engine.loader import load, load_gguf
from splitserve.engine.model_source import ModelError, resolve
from splitserve.engine.request import SamplingParams

from .conftest import make_engine

TEXTS = ["Hello world!", "The year 2024 had 366 days; 12345 is a number.", "  two spaces\n\nand\ttabs",
         "<|im_start|>user\nhi<|im_end|>", "émoji 🚀 ünïcode — dashes", "def f(x):\n    return x**2  # sq",
         "MiXeD CaSe and_under_scores", "" ]


def test_tokenizer_equals_transformers(smollm2_path, hf_tokenizer):
    tok = load_gguf(smollm2_path, torch.float32, "cpu").tokenizer
    for s in TEXTS:
        ids = tok.encode(s)
        assert ids == hf_tokenizer.encode(s, add_special_tokens=False), s
        assert tok.decode(ids, skip_special_tokens=False) == s
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(msgs) == hf_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs[1:]).startswith("<|im_start|>system\nYou are a helpful")


def test_second_load_uses_the_conversion_cache(smollm2_path, tmp_path):
    first = load_gguf(smollm2_path, torch.float32, "cpu", cache_dir=tmp_path)
    cached = list((tmp_path / "converted").glob("*.safetensors"))
    assert len(cached) == 1
    second = load_gguf(smollm2_path, torch.float32, "cpu", cache_dir=tmp_path)
    for k, v in first.weights.items():
        assert torch.equal(v, second.weights[k])


def test_missing_model():
    with pytest.raises(ModelError, match="no such file"):
        resolve("/does/not/exist.gguf")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelError, match="bad.gguf"):
        load(resolve(str(bad)))


def test_unsupported_file_and_dir(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelError, match="unsupported format"):
        resolve(str(f))
    with pytest.raises(ModelError, match="no config.json"):
        resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "x.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="unsupported architectures"):
        load(resolve(str(tmp_path)))


def test_unknown_dummy_shape():
    with pytest.raises(ModelError, match="unknown dummy shape"):
        load(resolve("dummy:nope"))


def test_dummy_shapes_are_real():
    a = SHAPES["llama3-8b"]
    assert 7.9e9 < a.num_params() < 8.1e9
    assert 69e9 < SHAPES["llama3-70b"].num_params() < 71.5e9


def _save_hf_model(kind: str, tmp_path, hf_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, eos_token_id=1, bos_token_id=0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True))
    model.eval()
    model.save_pretrained(tmp_path)
    hf_tokenizer.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_safetensors_dir_matches_transformers(kind, tmp_path, hf_tokenizer):
    hf = _save_hf_model(kind, tmp_path, hf_tokenizer)
    if kind == "qwen2":
        assert hf.model.layers[0].self_attn.q_proj.bias is not None
    eng = make_engine(str(tmp_path))
    prompts = [[5, 17, 99, 3], [200, 201, 7, 7, 8, 9, 100, 31, 64, 2, 5]]
    outs = eng.generate(prompts, SamplingParams(max_tokens=20, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=20, eos_token_id=-1,
                          pad_token_id=0, attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert o.token_ids == ref[0, len(p):].tolist()
    assert eng.tokenizer.chat_template is not None
