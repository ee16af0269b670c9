"""No pickle anywhere in the package (and, in a checkout, its benchmarks and scripts): every ``torch.load`` passes
``weights_only=True`` (torch < 2.6, which the dependency floor allows, defaults to False), nothing imports
pickle-based serializers, ``numpy.load`` never allows pickles; and the weights-only loads really refuse a pickled
object."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mi_crow
from mi_crow.mechanistic.sae.interop.files import read_torch_weights
from mi_crow.store.errors import CorruptStoreFileError

PACKAGE = Path(mi_crow.__file__).parent
_FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib", "jsonpickle"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _sources() -> list[Path]:
    """The package, and in a checkout its benchmarks and scripts too (they read files the package wrote)."""
    paths = sorted(PACKAGE.rglob("*.py"))
    for extra in ("benchmarks", "scripts"):
        folder = PACKAGE.parent / extra
        if folder.is_dir():
            paths += sorted(folder.rglob("*.py"))
    return paths


def _findings() -> list[str]:
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{where}:{node.lineno} imports {a.name}" for a in node.names
                          if a.name.split(".")[0] in _FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _FORBIDDEN_MODULES:
                found.append(f"{where}:{node.lineno} imports from {node.module}")
            elif isinstance(node, ast.Call):
                name = _dotted(node.func)
                kwargs = {k.arg: k.value for k in node.keywords}
                if name == "torch.load":
                    flag = kwargs.get("weights_only")
                    if not (isinstance(flag, ast.Constant) and flag.value is True):
                        found.append(f"{where}:{node.lineno} calls torch.load without weights_only=True")
                if name in ("np.load", "numpy.load"):
                    flag = kwargs.get("allow_pickle")
                    if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                        found.append(f"{where}:{node.lineno} calls numpy.load with allow_pickle")
    return found


def test_the_package_never_unpickles():
    assert _findings() == []


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The scan is not vacuous: a planted offending file is reported."""
    fake = tmp_path / "mi_crow"
    fake.mkdir()
    (fake / "bad.py").write_text("import pickle\nimport torch\nx = torch.load('a.pt')\n"
                                 "y = torch.load('b.pt', weights_only=False)\nz = torch.load('c.pt', weights_only=True)\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", fake)
    assert _findings() == ["mi_crow/bad.py:1 imports pickle",
                           "mi_crow/bad.py:3 calls torch.load without weights_only=True",
                           "mi_crow/bad.py:4 calls torch.load without weights_only=True"]


class _Payload:
    """Unpickling this would run code; a weights-only load must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_weights_only_loads_refuse_pickled_objects(tmp_path, capsys):
    path = tmp_path / "ae.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2), "extra": _Payload()}, path)
    with pytest.raises(CorruptStoreFileError, match="weights_only=True"):
        read_torch_weights(path)
    assert "unpickled!" not in capsys.readouterr().out
