"""The CLI's error model: user errors (MiCrowError) exit 2 with one line; anything else is an internal error,
exit 1, with a hint to re-run with -v; -v prints the traceback.

A library bug is simulated by making ``LanguageModel.from_huggingface`` (which ``mi-crow layers`` calls) raise.
"""

from __future__ import annotations

import pytest

from mi_crow import cli
from mi_crow.errors import StoreError, UserInputError
from mi_crow.language_model import LanguageModel
from mi_crow.mechanistic.sae import NonFiniteTrainingError


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _library_raises(monkeypatch, exc_or_function) -> None:
    """Make loading any model fail the given way (an exception to raise, or a function to call instead)."""
    if isinstance(exc_or_function, BaseException):
        def load(*args, **kwargs):
            raise exc_or_function
    else:
        load = exc_or_function
    monkeypatch.setattr(LanguageModel, "from_huggingface", classmethod(lambda cls, *a, **k: load(*a, **k)))


def test_a_user_error_from_a_command_is_one_line_and_exit_2(capsys, tmp_path) -> None:
    code, err = _run(capsys, "train", "--store", tmp_path / "empty")
    assert code == 2
    assert err.strip().splitlines() == [f"mi-crow train: error: no activation runs in the store {tmp_path / 'empty'}; "
                                        "run `mi-crow save` first"]


@pytest.mark.parametrize(
    "exc",
    [UserInputError("--layer 'x' is not a layer"), StoreError("runs/x/meta.json is corrupt"),
     NonFiniteTrainingError("every batch had NaN")],
)
def test_every_mi_crow_error_exits_2(capsys, monkeypatch, tmp_path, exc) -> None:
    _library_raises(monkeypatch, exc)
    code, err = _run(capsys, "layers", "--model", tmp_path)
    assert code == 2
    assert err.strip().splitlines() == [f"mi-crow layers: error: {exc}"]


@pytest.mark.parametrize(
    "exc, shown",
    [
        (KeyError("layer_dims"), "KeyError: 'layer_dims'"),
        (RuntimeError("CUDA error: device-side assert"), "RuntimeError: CUDA error: device-side assert"),
        # Builtin ValueError / TypeError / FileNotFoundError used to pass for user errors: now they are bugs.
        (ValueError("math domain error"), "ValueError: math domain error"),
        (TypeError("unsupported operand"), "TypeError: unsupported operand"),
        (FileNotFoundError("/tmp/x"), "FileNotFoundError: /tmp/x"),
    ],
)
def test_anything_else_is_an_internal_error_exit_1(capsys, monkeypatch, tmp_path, exc, shown) -> None:
    _library_raises(monkeypatch, exc)
    code, err = _run(capsys, "layers", "--model", tmp_path)
    assert code == 1
    assert err.strip().splitlines() == [
        f"mi-crow layers: internal error: {shown} (re-run with -v for the traceback)"
    ]


@pytest.mark.parametrize("argv", [["-v", "layers"], ["layers", "-v"], ["layers", "--verbose"]])
def test_verbose_prints_the_traceback_of_an_internal_error(capsys, monkeypatch, tmp_path, argv) -> None:
    def buggy_loader(*args, **kwargs):
        return {}["missing"]

    _library_raises(monkeypatch, buggy_loader)
    code, err = _run(capsys, *argv, "--model", tmp_path)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "buggy_loader" in err
    assert err.strip().splitlines()[-1] == "mi-crow layers: internal error: KeyError: 'missing'"


def test_verbose_prints_the_traceback_of_a_user_error_too(capsys, monkeypatch, tmp_path) -> None:
    _library_raises(monkeypatch, UserInputError("bad flag"))
    code, err = _run(capsys, "-v", "layers", "--model", tmp_path)
    assert code == 2
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == "mi-crow layers: error: bad flag"


def test_a_missing_model_directory_is_a_user_error(capsys, tmp_path) -> None:
    code, err = _run(capsys, "layers", "--model", tmp_path / "nope")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such directory" in err
