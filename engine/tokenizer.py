"""Tokenizers: byte-level BPE (from GGUF metadata or tokenizer.json) and a byte tokenizer for dummy
models; chat templates rendered with jinja2 the way Hugging Face does."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import jinja2
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
_SPECIAL_TYPES = (2, 3, 4)


@dataclass
class TextTokenizer:
    """What the engine needs of a tokenizer: encode, decode, specials and the chat template."""
    tok: Any                                     # tokenizers.Tokenizer or ByteTokenizer
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead of chat messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"chat message {i} must be a mapping with 'role' and 'content'")
        env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        tmpl = env.from_string(self.chat_template)
        return tmpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token="", eos_token="")


def _raise_template_error(msg: str) -> None:
    raise ValueError(f"chat template: {msg}")


def bpe_from_gguf_fields(tokens: list[str], merges: list[str], token_types: list[int],
                         pre: str) -> tuple[Tokenizer, frozenset[int]]:
    """A byte-level BPE tokenizer equal to the one GGUF's tokenizer.ggml.* fields describe."""
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "qwen2", "deepseek-llm"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), split])
    elif pre in ("gpt2", "default", "gpt-2", "olmo", "jais"):
        tk.pre_tokenizer = split
    elif pre == "llama-bpe":  # Llama 3: digits in groups of up to 3
        llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        raise ValueError(f"unsupported GGUF tokenizer pre-tokenizer {pre!r}")
    tk.decoder = decoders.ByteLevel()
    specials = [i for i, t in enumerate(token_types) if t in _SPECIAL_TYPES]
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in specials])
    return tk, frozenset(specials)


class ByteTokenizer:
    """For dummy models: token id = byte value + 2 (0 = bos, 1 = eos); ids >= 258 decode to nothing."""
    OFFSET = 2

    def __init__(self, vocab_size: int):
        self._vocab = vocab_size

    def get_vocab_size(self) -> int:
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> Any:
        class _Enc:
            ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return _Enc()

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raw = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET)
        return raw.decode("utf-8", errors="replace")


def byte_tokenizer(vocab_size: int, eos: tuple[int, ...]) -> TextTokenizer:
    return TextTokenizer(ByteTokenizer(vocab_size), eos_token_ids=eos or (1,), bos_token_id=0)
