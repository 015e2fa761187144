"""Incremental detokenization (engine/detokenizer.py) against decoding the whole output, with the
real SmolLM2 tokenizer (byte-level BPE from the GGUF) and the byte tokenizer of dummy models, on
real text (multi-byte characters split across tokens) and on random token ids."""
from __future__ import annotations

import random

import pytest

from splitserve.engine.detokenizer import IncrementalDetokenizer
from splitserve.engine.tokenizer import byte_tokenizer

TEXT = ("Héllo wörld — naïve café, 東京 and Zürich 🚀🚀; x² ≠ y³. Émile's \"quotes\" and\ttabs\n"
        "and newlines, numbers 12345 and emoji 👩‍👩‍👧 stay whole. ") * 3


@pytest.fixture(scope="module")
def smollm2():
    from splitserve.engine.loader import load_tokenizer
    from splitserve.engine.model_source import resolve
    return load_tokenizer(resolve("smollm2", None))


def _check(tok, ids, step_sizes):
    det, pos, i = IncrementalDetokenizer(tok), 0, 0
    while pos < len(ids):
        n = step_sizes[i % len(step_sizes)]
        i += 1
        pos = min(pos + n, len(ids))
        text = det.update(ids[:pos])
        full = tok.decode(ids[:pos])
        assert full.startswith(text), (pos, text[-20:], full[-20:])
        if not full.endswith("\ufffd"):
            assert text == full, pos
        assert det.final_text() == full, pos
    return det


@pytest.mark.parametrize("steps", [[1], [1, 3, 2], [7]])
def test_real_text_streams_equal_whole_decoding(smollm2, steps):
    ids = smollm2.encode(TEXT)
    det = _check(smollm2, ids, steps)
    assert det.final_text() == smollm2.decode(ids)


def test_random_ids_with_broken_utf8(smollm2):
    rnd = random.Random(5)
    for _ in range(20):
        ids = [rnd.randrange(smollm2.vocab_size) for _ in range(rnd.randrange(1, 120))]
        _check(smollm2, ids, [1, 2])
    btok = byte_tokenizer(512, (1,))
    for _ in range(50):
        ids = [rnd.randrange(2, 258) for _ in range(rnd.randrange(1, 200))]   # raw bytes: much invalid UTF-8
        _check(btok, ids, [1])


def test_window_stays_short(smollm2):
    """The point: each update decodes a few tokens, not the whole output."""
    calls = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return smollm2.decode(ids)
    ids = smollm2.encode(TEXT * 4)
    det = IncrementalDetokenizer(Counting())
    for k in range(1, len(ids) + 1):
        det.update(ids[:k])
    assert det.text == smollm2.decode(ids)
    assert max(calls) <= 16, max(calls)
