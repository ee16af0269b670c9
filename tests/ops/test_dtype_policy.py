"""The model dtype policy (``mi_crow.defaults.preferred_model_dtype``) and the places that use it.

bf16 exactly where the hardware has bf16 matrix instructions (judged here independently, from /proc/cpuinfo's
flags), float32 elsewhere; ``"auto"`` / ``"float32"`` / ``"bfloat16"`` and ``$MI_CROW_MODEL_DTYPE`` resolve as
documented, bad values fail naming the argument; ``LanguageModel.from_huggingface(dtype="auto")`` and the CLI's
model loading load the model in the policy's dtype.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mi_crow.defaults as defaults
from mi_crow.errors import UserInputError
from mi_crow.language_model import LanguageModel


def _cpuinfo_has_bf16() -> bool | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    return None if match is None else bool({"avx512_bf16", "amx_bf16"} & set(match.group(1).split()))


@pytest.mark.skipif(_cpuinfo_has_bf16() is None, reason="needs /proc/cpuinfo with a flags line (Linux x86)")
def test_cpu_policy_follows_the_bf16_instructions():
    has = _cpuinfo_has_bf16()
    assert defaults.cpu_has_bf16_matmul() == has
    assert defaults.preferred_model_dtype("cpu") == (torch.bfloat16 if has else torch.float32)
    assert defaults.preferred_model_dtype(None) == defaults.preferred_model_dtype("cpu")


def test_policy_per_device(monkeypatch):
    monkeypatch.setattr(defaults, "cpu_has_bf16_matmul", lambda: True)
    assert defaults.preferred_model_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(defaults, "cpu_has_bf16_matmul", lambda: False)
    assert defaults.preferred_model_dtype(torch.device("cpu")) == torch.float32
    # Other devices: float32 unless a CUDA GPU says it supports bf16.
    assert defaults.preferred_model_dtype("meta") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert defaults.preferred_model_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert defaults.preferred_model_dtype("cuda:0") == torch.float32


def test_resolve_model_dtype(monkeypatch):
    monkeypatch.delenv(defaults.MODEL_DTYPE_ENV, raising=False)
    monkeypatch.setattr(defaults, "cpu_has_bf16_matmul", lambda: True)
    assert defaults.resolve_model_dtype() == torch.bfloat16  # None -> "auto"
    assert defaults.resolve_model_dtype("AUTO") == torch.bfloat16
    assert defaults.resolve_model_dtype("float32") == torch.float32
    assert defaults.resolve_model_dtype(torch.float16) == torch.float16
    monkeypatch.setattr(defaults, "cpu_has_bf16_matmul", lambda: False)
    assert defaults.resolve_model_dtype("auto") == torch.float32
    assert defaults.resolve_model_dtype("bfloat16") == torch.bfloat16
    monkeypatch.setenv(defaults.MODEL_DTYPE_ENV, "bfloat16")
    assert defaults.resolve_model_dtype() == torch.bfloat16
    assert defaults.resolve_model_dtype("float32") == torch.float32  # an explicit value wins over the variable
    monkeypatch.setenv(defaults.MODEL_DTYPE_ENV, "int8")
    with pytest.raises(UserInputError, match=r"MI_CROW_MODEL_DTYPE must be 'auto', 'float32', 'bfloat16'.*'int8'"):
        defaults.resolve_model_dtype()
    with pytest.raises(UserInputError, match=r"dtype must be 'auto'.*float64"):
        defaults.resolve_model_dtype(torch.float64)


def test_from_huggingface_auto_and_cli_loading(monkeypatch, tmp_path):
    from mi_crow.cli import common
    from mi_crow.testing import make_tiny_llama_lm

    folder = tmp_path / "tiny"
    lm = make_tiny_llama_lm()
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)

    monkeypatch.delenv(defaults.MODEL_DTYPE_ENV, raising=False)
    monkeypatch.setattr(defaults, "cpu_has_bf16_matmul", lambda: True)
    assert next(LanguageModel.from_huggingface(folder, dtype="auto").model.parameters()).dtype == torch.bfloat16
    assert next(common.load_model(str(folder)).model.parameters()).dtype == torch.bfloat16
    assert next(LanguageModel.from_huggingface(folder).model.parameters()).dtype == torch.float32  # None: as saved
    monkeypatch.setattr(defaults, "cpu_has_bf16_matmul", lambda: False)
    assert next(common.load_model(str(folder)).model.parameters()).dtype == torch.float32
    monkeypatch.setenv(defaults.MODEL_DTYPE_ENV, "bfloat16")
    loaded = common.load_model(str(folder))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    # The bf16 model runs (a forward through the wrapper).
    out = loaded.forwards(["a short text"])
    assert out.logits.dtype == torch.bfloat16
