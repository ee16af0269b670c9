"""LocalStore primitives, typed helpers, atomic writes and bad input; the generic Store API on a second backend."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch
from safetensors import safe_open

from mi_crow.store import (
    CorruptStoreFileError,
    LocalStore,
    Store,
    StoreKeyNotFoundError,
    StoreNotWritableError,
)


class DictStore(Store):
    """In-memory backend implementing only the primitives: proves the generic API needs nothing else."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.files[key] = bytes(data)

    def get_bytes(self, key: str) -> bytes:
        if key not in self.files:
            raise StoreKeyNotFoundError(f"no key {self.location(key)}")
        return self.files[key]

    def exists(self, key: str) -> bool:
        return key in self.files or any(k.startswith(key.rstrip("/") + "/") for k in self.files)

    def list(self, prefix: str = "") -> list[str]:
        p = prefix.rstrip("/")
        return sorted(k for k in self.files if not p or k == p or k.startswith(p + "/"))

    def delete(self, prefix: str) -> None:
        for k in self.list(prefix):
            del self.files[k]

    def location(self, key: str) -> str:
        return f"mem://{key}"


class NotAllowed:
    """A custom class: weights_only loading must refuse to unpickle it."""


@pytest.fixture(params=["local", "dict"])
def any_store(request, tmp_path) -> Store:
    return LocalStore(tmp_path / "store") if request.param == "local" else DictStore()


def test_store_is_abstract():
    with pytest.raises(TypeError):
        Store()  # type: ignore[abstract]


def test_bytes_json_roundtrip_list_exists_delete(any_store: Store):
    any_store.put_bytes("a/b/c.bin", b"\x00\x01payload")
    any_store.put_json("runs/r1/config.json", {"lr": 1e-3, "layers": ["model.layers.3"], "nested": {"k": 4}})
    assert any_store.get_bytes("a/b/c.bin") == b"\x00\x01payload"
    assert any_store.get_json("runs/r1/config.json") == {"lr": 1e-3, "layers": ["model.layers.3"], "nested": {"k": 4}}
    assert any_store.exists("a/b/c.bin") and any_store.exists("a") and not any_store.exists("zzz")
    assert any_store.list() == ["a/b/c.bin", "runs/r1/config.json"]
    assert any_store.list("runs") == ["runs/r1/config.json"]
    assert any_store.list("nothing") == []
    any_store.put_bytes("a/b/c.bin", b"new")  # overwrite
    assert any_store.get_bytes("a/b/c.bin") == b"new"
    any_store.delete("a")
    assert not any_store.exists("a/b/c.bin")
    assert any_store.list() == ["runs/r1/config.json"]
    any_store.delete("a")  # deleting a missing key is not an error


def test_tensors_roundtrip_exact_with_metadata(any_store: Store):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(5, 7, generator=g),
        "half": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "ids": torch.arange(12).reshape(3, 4),
        "view": torch.randn(4, 6, generator=g)[:, 1:3],  # non-contiguous view is stored by value
    }
    any_store.put_tensors("sae_models/s/model.safetensors", tensors, metadata={"k": "4"})
    back = any_store.get_tensors("sae_models/s/model.safetensors")
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)
    if isinstance(any_store, LocalStore):
        with safe_open(any_store.path("sae_models/s/model.safetensors"), framework="pt") as f:
            assert f.metadata() == {"k": "4"}


def test_torch_roundtrip_and_no_pickled_code(any_store: Store):
    obj = {"step": 3, "state": {"w": torch.ones(2, 2)}, "names": ["a", "b"]}
    any_store.put_torch("runs/r/ckpt.pt", obj)
    back = any_store.get_torch("runs/r/ckpt.pt")
    assert back["step"] == 3 and back["names"] == ["a", "b"] and torch.equal(back["state"]["w"], torch.ones(2, 2))

    any_store.put_torch("runs/r/evil.pt", {"x": NotAllowed()})
    with pytest.raises(CorruptStoreFileError, match="evil.pt"):
        any_store.get_torch("runs/r/evil.pt")


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    store = LocalStore(tmp_path / "s")
    with pytest.raises(StoreKeyNotFoundError, match=re.escape(str(tmp_path / "s" / "x" / "missing.json"))):
        store.get_json("x/missing.json")
    with pytest.raises(StoreKeyNotFoundError, match="missing.safetensors"):
        store.get_tensors("x/missing.safetensors")
    (tmp_path / "s" / "bad.json").write_text("{not json")
    with pytest.raises(CorruptStoreFileError, match=re.escape(str(tmp_path / "s" / "bad.json"))):
        store.get_json("bad.json")
    store.put_tensors("t.safetensors", {"a": torch.ones(100)})
    raw = (tmp_path / "s" / "t.safetensors").read_bytes()
    (tmp_path / "s" / "t.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptStoreFileError, match=re.escape(str(tmp_path / "s" / "t.safetensors"))):
        store.get_tensors("t.safetensors")
    (tmp_path / "s" / "m.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptStoreFileError, match="m.pt"):
        store.get_torch("m.pt")


def test_generic_corrupt_tensors_names_location():
    store = DictStore()
    store.put_bytes("x.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(CorruptStoreFileError, match="mem://x.safetensors"):
        store.get_tensors("x.safetensors")


@pytest.mark.parametrize("key", ["/abs/path", "a/../b", "a//b", "./a", "a\\b", "a/.hidden.json"])
def test_bad_keys_rejected(tmp_path, key):
    store = LocalStore(tmp_path)
    with pytest.raises(ValueError, match="key must"):
        store.put_bytes(key, b"x")


def test_bad_argument_types(tmp_path):
    store = LocalStore(tmp_path)
    with pytest.raises(TypeError, match="key must be a str"):
        store.get_bytes(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data must be bytes"):
        store.put_bytes("a", "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        store.put_json("a.json", {"t": torch.ones(1)})
    with pytest.raises(TypeError, match=r"tensors\['a'\] must be a Tensor"):
        store.put_tensors("a.safetensors", {"a": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="non-empty dict"):
        store.put_tensors("a.safetensors", {})
    with pytest.raises(TypeError, match="metadata must be a dict str -> str"):
        store.put_tensors("a.safetensors", {"a": torch.ones(1)}, metadata={"k": 4})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="whole store"):
        store.delete("")
    with pytest.raises(TypeError, match="base_path must be a str"):
        LocalStore(42)  # type: ignore[arg-type]


def test_base_path_created_and_listed_as_directory(tmp_path):
    store = LocalStore(tmp_path / "deep" / "er")
    assert store.base_path.is_dir() and store.base_path == (tmp_path / "deep" / "er").resolve()
    assert store.list() == []


def test_base_path_under_a_regular_file_is_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(StoreNotWritableError, match=re.escape(str(blocker / "store"))):
        LocalStore(blocker / "store")
    with pytest.raises(StoreNotWritableError, match="not a directory"):
        LocalStore(blocker)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_read_only_directory_is_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(StoreNotWritableError, match=re.escape(str(ro))):
            LocalStore(ro)
    finally:
        ro.chmod(stat.S_IRWXU)


def test_crash_before_rename_keeps_old_content_and_no_temp(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    store.put_json("runs/r/h.json", {"v": 1})

    def crash(src, dst):
        raise KeyboardInterrupt("simulated crash between temp write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.put_json("runs/r/h.json", {"v": 2})
    with pytest.raises(KeyboardInterrupt):
        store.put_tensors("runs/r/new.safetensors", {"a": torch.ones(3)})
    monkeypatch.undo()
    assert store.get_json("runs/r/h.json") == {"v": 1}
    assert not store.exists("runs/r/new.safetensors")
    assert sorted(os.listdir(tmp_path / "runs" / "r")) == ["h.json"]


def test_leftover_temp_file_of_killed_writer_is_invisible(tmp_path):
    store = LocalStore(tmp_path)
    store.put_json("runs/r/h.json", {"v": 1})
    # What a SIGKILL between write and rename leaves behind: a hidden temp file beside the destination.
    (tmp_path / "runs" / "r" / ".h.json.abc123.tmp").write_text('{"v": 2')
    assert store.list() == ["runs/r/h.json"]
    assert store.get_json("runs/r/h.json") == {"v": 1}


def test_atomic_write_content_is_complete_json(tmp_path):
    store = LocalStore(tmp_path, fsync=False)
    payload = {"x": list(range(1000))}
    store.put_json("p.json", payload)
    assert json.loads((tmp_path / "p.json").read_text()) == payload


def test_activation_run_api_on_a_primitives_only_backend():
    store = DictStore()
    g = torch.Generator().manual_seed(0)
    written, full = [], []
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for i in range(3):
        acts = torch.randn(2, 5, 3, generator=g)
        store.write_activation_batch("r", i, {"model.layers.0": acts}, mask)
        written.append(acts[mask.bool()])
        full.append(acts)
    assert store.list_runs() == ["r"] and store.list_batches("r") == [0, 1, 2]
    back = store.load_batch("r", 1, "model.layers.0")
    assert torch.equal(back.activations, full[1]) and torch.equal(back.attention_mask, mask)
    got = torch.cat(list(store.activation_reader("r", "model.layers.0", 4, shuffle=False, drop_last=False)))
    assert torch.equal(got, torch.cat(written))
