"""One error model and one validation layer in the store: errors are mi_crow errors, every key goes through
``check_identifier``, the reader's argument checks raise what the rest of the package raises, and the reader uses
only the store's public API (no import cycle with ``store/base.py``)."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch

import mi_crow.errors
import mi_crow.store.reader
from mi_crow.errors import ArgumentTypeError, UserInputError
from mi_crow.store import (
    CorruptStoreFileError,
    LocalStore,
    ResourceBusyError,
    RunNotFoundError,
    Store,
    StoreError,
    StoreKeyNotFoundError,
    StoreNotWritableError,
    StoreWriteError,
)
from mi_crow.validation import check_identifier

LAYER = "model.layers.0"


@pytest.fixture
def store(tmp_path) -> LocalStore:
    s = LocalStore(tmp_path / "store", fsync=False)
    mask = torch.ones(2, 3, dtype=torch.long)
    s.write_activation_batch("r", 0, {LAYER: torch.randn(2, 3, 4)}, mask)
    return s


@pytest.mark.parametrize(
    ("cls", "builtins"),
    [
        (StoreKeyNotFoundError, (FileNotFoundError,)),
        (RunNotFoundError, (FileNotFoundError,)),
        (CorruptStoreFileError, (ValueError,)),
        (StoreNotWritableError, (ValueError, PermissionError)),
        (StoreWriteError, (OSError,)),
        (ResourceBusyError, (BlockingIOError,)),
    ],
)
def test_store_errors_are_mi_crow_store_errors_and_builtins(cls, builtins):
    assert issubclass(cls, mi_crow.errors.StoreError) and issubclass(cls, mi_crow.errors.MiCrowError)
    for builtin in builtins:
        assert issubclass(cls, builtin)
    assert StoreError is mi_crow.errors.StoreError


def test_a_missing_run_is_a_mi_crow_error(store: LocalStore):
    with pytest.raises(mi_crow.errors.StoreError, match="nope"):
        store.read_run_meta("nope")


BAD_IDS = ["a/b", "..", ".hidden", "", "a\\b", "tab\there", "new\nline", "x" * 256, 7, None]


def _expected(value, argument):
    """The exception check_identifier raises for ``value`` (the single rule every store key follows)."""
    with pytest.raises((UserInputError, ArgumentTypeError)) as info:
        check_identifier(value, argument)
    return type(info.value), str(info.value)


# (call, name of the argument the message must name). Every store entry point that takes a run id, a layer name or
# an SAE id, for reading and for writing.
ENTRY_POINTS = [
    (lambda s, v: s.run_exists(v), "run_id"),
    (lambda s, v: s.read_run_meta(v), "run_id"),
    (lambda s, v: s.get_run_metadata(v), "run_id"),
    (lambda s, v: s.write_run_meta(v, {"a": 1}), "run_id"),
    (lambda s, v: s.write_activation_batch(v, 0, {LAYER: torch.ones(2, 3, 4)}, torch.ones(2, 3, dtype=torch.long)),
     "run_id"),
    (lambda s, v: s.write_activation_batch("r", 1, {v: torch.ones(2, 3, 4)}, torch.ones(2, 3, dtype=torch.long)),
     "layer name"),
    (lambda s, v: s.load_batch(v, 0, LAYER), "run_id"),
    (lambda s, v: s.load_batch("r", 0, v), "layer"),
    (lambda s, v: s.list_run_batches(v), "run_id"),
    (lambda s, v: s.get_run_batch(v, 0), "run_id"),
    (lambda s, v: s.load_batch_extra(v, 0), "run_id"),
    (lambda s, v: s.delete_run(v), "run_id"),
    (lambda s, v: s.activation_reader(v, LAYER, 2), "run_id"),
    (lambda s, v: s.activation_reader("r", v, 2), "layer"),
    (lambda s, v: s.lock_run(v), "run_id"),
    (lambda s, v: s.lock_run(v, kind="training"), "run_id"),
    (lambda s, v: s.sae_key(v, "config.json"), "sae_id"),
    (lambda s, v: s.training_key(v, "training_history.json"), "run_id"),
]


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
@pytest.mark.parametrize(("call", "argument"), ENTRY_POINTS)
def test_every_store_key_uses_the_one_identifier_rule(store: LocalStore, call, argument, value):
    exc_type, message = _expected(value, argument)
    with pytest.raises(exc_type) as info:
        call(store, value)
    assert type(info.value) is exc_type and str(info.value) == message
    assert store.list_batches("r") == [0]  # nothing was written or deleted


def test_identifiers_accepted_by_one_entry_point_are_accepted_by_all(store: LocalStore):
    name = "model.layers.0:résumé-x" + "y" * 200  # dots, colon, non-ASCII, 223 characters: one folder name
    acts = {name: torch.randn(2, 3, 4)}
    mask = torch.ones(2, 3, dtype=torch.long)
    store.write_activation_batch(name, 0, acts, mask)
    assert torch.equal(store.load_batch(name, 0, name).activations, acts[name])
    assert store.sae_key(name, "model.pt") == f"sae_models/{name}/model.pt"
    assert store.training_key(name) == f"runs/{name}"
    with store.lock_run(name, kind="training"):
        pass


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        (dict(batch_size="8"), ArgumentTypeError, "batch_size must be an int, got '8'"),
        (dict(batch_size=8.0), ArgumentTypeError, "batch_size must be an int, got 8.0"),
        (dict(buffer_tokens=True), ArgumentTypeError, "buffer_tokens must be an int, got True"),
        (dict(epochs="2"), ArgumentTypeError, "epochs must be an int, got '2'"),
        (dict(seed=None), ArgumentTypeError, "seed must be an int, got None"),
        (dict(shuffle="yes"), ArgumentTypeError, "shuffle must be a bool, got 'yes'"),
        (dict(batch_size=0), UserInputError, "batch_size must be > 0, got 0"),
    ],
)
def test_reader_arguments_raise_the_shared_validation_errors(store: LocalStore, kwargs, exc, message):
    args = dict(batch_size=2) | kwargs
    with pytest.raises(exc) as info:
        store.activation_reader("r", LAYER, args.pop("batch_size"), **args)
    assert str(info.value) == message
    # A wrong type is both a TypeError and a ValueError, whichever clause the caller wrote.
    assert isinstance(info.value, ValueError)


def test_store_argument_errors_are_user_input_errors(store: LocalStore):
    with pytest.raises(ArgumentTypeError, match="batch_index must be an int"):
        store.load_batch("r", "0", LAYER)
    with pytest.raises(UserInputError, match="batch_index must be >= 0, got -1"):
        store.write_activation_batch("r", -1, {LAYER: torch.ones(2, 3, 4)}, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ArgumentTypeError, match="attention_mask must be an integer or bool tensor"):
        store.write_activation_batch("r", 1, {LAYER: torch.ones(2, 3, 4)}, torch.ones(2, 3))
    with pytest.raises(UserInputError, match="kind must be one of"):
        store.lock_run("r", kind="checkpoints")


def test_reader_imports_nothing_from_the_store_base_and_uses_only_public_store_methods():
    source = inspect.getsource(mi_crow.store.reader)
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "mi_crow.store.base" not in imported and "mi_crow.store.local" not in imported
    private = sorted({node.attr for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                      and node.value.attr == "store" and node.attr.startswith("_")})
    assert private == []
    # What the reader calls on the store is part of Store's documented API.
    for method in ("read_run_meta", "read_tokens", "batch_key", "location"):
        assert getattr(Store, method).__doc__


def test_read_batch_file_names_the_path_of_a_missing_file(store: LocalStore):
    with pytest.raises(StoreKeyNotFoundError, match=str(store.path("activations/r/batch_5/model.layers.0"))):
        store.read_batch_file("r", 5, LAYER)
