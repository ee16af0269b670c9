"""Shared fixtures: tiny GPT-2 / Llama LanguageModels built offline (see mi_crow.testing), a store, sample texts.

The model fixtures are function-scoped on purpose: a LanguageModel carries registered hooks, and a fresh one per
test keeps one test's hooks from leaking into another. Building one takes a few milliseconds (the tokenizer is
trained once per session and cached).
"""

from __future__ import annotations

import pytest

from mi_crow.testing import SAMPLE_TEXTS, make_tiny_gpt2_lm, make_tiny_llama_lm


@pytest.fixture
def sample_texts() -> list[str]:
    """Two dozen short English sentences of varied length (a copy, safe to modify)."""
    return list(SAMPLE_TEXTS)


@pytest.fixture
def store(tmp_path):
    """An empty LocalStore in a temporary directory (no fsync: writes stay atomic, tests stay fast)."""
    from mi_crow.store import LocalStore

    return LocalStore(tmp_path / "store", fsync=False)


@pytest.fixture
def tiny_gpt2(store):
    """A LanguageModel over a seeded 3-block GPT-2 (width 32) with a right-padding tokenizer, wired to ``store``."""
    return make_tiny_gpt2_lm(store=store)


@pytest.fixture
def tiny_llama(store):
    """A LanguageModel over a seeded 3-layer Llama (width 32, GQA) with a BOS/left-padding tokenizer and ``store``."""
    return make_tiny_llama_lm(store=store)


@pytest.fixture(params=["gpt2", "llama"])
def tiny_lm(request, store):
    """Both tiny models in turn (GPT-2 shape, then Llama shape)."""
    maker = make_tiny_gpt2_lm if request.param == "gpt2" else make_tiny_llama_lm
    return maker(store=store)
