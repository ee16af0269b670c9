"""DOCUMENTED_API.md, "Imports": the module paths people use, ``mi_crow.ping()``, ``mi_crow.__version__``; and the
language_model package imports without cycles hidden behind function-level imports."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import mi_crow

ROOT = Path(__file__).resolve().parents[2]


def test_ping_and_version_from_package_metadata():
    assert mi_crow.ping() == "pong"
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert mi_crow.__version__ == declared


def test_language_model_path():
    from mi_crow.language_model import LanguageModel
    from mi_crow.language_model.language_model import LanguageModel as Deep

    assert LanguageModel is Deep


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("mi_crow.hooks.implementations.layer_activation_detector", "LayerActivationDetector"),
        ("mi_crow.hooks.implementations.model_input_detector", "ModelInputDetector"),
        ("mi_crow.hooks.implementations.model_output_detector", "ModelOutputDetector"),
        ("mi_crow.hooks.implementations.function_controller", "FunctionController"),
        ("mi_crow.hooks.implementations", "LayerActivationDetector"),
        ("mi_crow.hooks.detector", "Detector"),
        ("mi_crow.hooks.controller", "Controller"),
        ("mi_crow.hooks.hook", "Hook"),
        ("mi_crow.hooks.hook", "HookType"),
        ("mi_crow.hooks.hook", "HookError"),
    ],
)
def test_hook_module_paths_give_the_one_class(module, name):
    import mi_crow.hooks

    assert getattr(importlib.import_module(module), name) is getattr(mi_crow.hooks, name)


def test_datasets_path():
    from mi_crow.datasets import BaseDataset, ClassificationDataset, HuggingFaceDataset, TextDataset

    for cls in (ClassificationDataset, HuggingFaceDataset, TextDataset):
        assert issubclass(cls, BaseDataset)
    assert issubclass(ClassificationDataset, TextDataset)


@pytest.mark.parametrize(
    "module",
    ["activations", "inference", "layers", "language_model", "context"],
)
def test_each_language_model_module_imports_first_in_a_fresh_interpreter(module):
    # A cycle between these modules shows up as an ImportError when one of them is imported first.
    code = f"import mi_crow.language_model.{module}"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _function_level_mi_crow_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and (inner.module or "").startswith("mi_crow"):
                    found.append(f"{path.name}:{inner.lineno} from {inner.module}")
                if isinstance(inner, ast.Import) and any(a.name.startswith("mi_crow") for a in inner.names):
                    found.append(f"{path.name}:{inner.lineno} import")
    return found


@pytest.mark.parametrize("package", ["language_model", "hooks", "datasets"])
def test_no_mi_crow_imports_hidden_in_functions(package):
    files = sorted((ROOT / "mi_crow" / package).rglob("*.py"))
    assert files
    assert [hit for f in files for hit in _function_level_mi_crow_imports(f)] == []
