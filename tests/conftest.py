"""Shared fixtures. Heavy ones (the real SmolLM2 model, transformers) are session-scoped."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_path():
    from splitserve.engine.model_source import resolve
    return resolve("smollm2").path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own GGUF loader: an independent dequantization of the same file."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


def make_engine(model: str = "smollm2", **sections):
    """An LLMEngine on CPU with config overrides, e.g. cache={"num_blocks": 64}."""
    from splitserve.config import Config
    from splitserve.engine.engine import LLMEngine
    cfg = Config().replace("model", model=model, device="cpu")
    for section, changes in sections.items():
        cfg = cfg.replace(section, **changes)
    return LLMEngine.from_config(cfg)


@pytest.fixture(scope="session")
def smollm2_engine():
    return make_engine()
