"""Files written by mi_crow get the permissions of the process umask, like files written with plain ``open``.

Store files, concept exports, the HTML report and the default-model cache all go through one ``atomic_write``; the
expected mode is computed by hand (``0o666 & ~umask`` for files, ``0o777 & ~umask`` for folders), and a file made
with ``open`` under the same umask is the reference.
"""

from __future__ import annotations

import bz2
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from mi_crow import defaults
from mi_crow.store import LocalStore, atomic_directory, atomic_write, atomic_write_bytes, atomic_write_text

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _reference_mode(folder: Path) -> int:
    ref = folder / "reference-open.txt"
    with open(ref, "w") as handle:
        handle.write("x")
    mode = _mode(ref)
    ref.unlink()
    return mode


def test_store_files_follow_the_umask(tmp_path, umask):
    store = LocalStore(tmp_path / "store", fsync=True)
    store.put_bytes("a/b.bin", b"x")
    store.put_json("runs/r/config.json", {"a": 1})
    store.put_tensors("sae_models/s/model.safetensors", {"w": torch.ones(2)})
    store.put_torch("sae_models/s/model.pt", {"w": torch.ones(2)})
    mask = torch.ones(2, 3, dtype=torch.long)
    store.write_activation_batch("r", 0, {"h.0": torch.randn(2, 3, 4)}, mask, extra={"input_ids": mask})
    files = [store.path(k) for k in store.list()]
    assert len(files) == 7  # the four above, meta.json, the layer file, extra.safetensors
    want = 0o666 & ~umask
    assert want == _reference_mode(tmp_path)
    assert {str(p.relative_to(store.base_path)): oct(_mode(p)) for p in files} == \
        {str(p.relative_to(store.base_path)): oct(want) for p in files}
    # Folders the store creates follow the umask too (0o777 & ~umask).
    for folder in (store.path("activations/r/batch_0/h.0"), store.path("sae_models/s")):
        assert _mode(folder) == 0o777 & ~umask
    # Rewriting a file keeps the umask's mode (a new temporary file replaces it).
    store.put_json("runs/r/config.json", {"a": 2})
    assert _mode(store.path("runs/r/config.json")) == want


def test_atomic_write_helpers_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    a = atomic_write_bytes(tmp_path / "x" / "a.bin", b"\x00\x01")
    b = atomic_write_text(tmp_path / "b.txt", "héllo\n")
    c = atomic_write(tmp_path / "c.txt", lambda tmp: Path(tmp).write_text("c"))
    assert a.read_bytes() == b"\x00\x01" and b.read_text(encoding="utf-8") == "héllo\n" and c.read_text() == "c"
    assert [_mode(p) for p in (a, b, c)] == [want] * 3
    d = atomic_directory(tmp_path / "dir", lambda tmp: (tmp / "f.txt").write_text("f"))
    assert _mode(d) == 0o777 & ~umask and _mode(d / "f.txt") == want
    # No temporary files are left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.txt", "c.txt", "dir", "x"]


def test_concept_exports_use_the_same_atomic_write(tmp_path, umask):
    # The concept dictionary writes through mi_crow.store.local.atomic_write: the same function.
    from mi_crow.store import local

    assert local.atomic_write is atomic_write
    out = local.atomic_write(tmp_path / "concepts.json", lambda tmp: Path(tmp).write_text("{}"))
    assert _mode(out) == 0o666 & ~umask


def test_report_follows_the_umask(tmp_path, umask):
    from mi_crow.report import write_feature_report

    exported = {"n_latents": 4, "neurons": [{"neuron": 2, "top_texts": [
        {"text": "alpha beta", "activation": 1.5, "token_position": 1, "token": "beta", "token_id": 9}]}]}
    out = write_feature_report(tmp_path / "sub" / "report.html", top_texts=exported)
    assert _mode(out) == 0o666 & ~umask
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


def _tiny_dump(path: Path) -> None:
    text = "A paragraph about testing long enough to be kept by the corpus parser. " * 3
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><page><title>T</title><ns>0</ns><id>1</id>'
           f'<revision><id>2</id><text xml:space="preserve">{text}</text></revision></page></mediawiki>')
    with bz2.open(path, "wt", encoding="utf-8") as fh:
        fh.write(xml)


def test_default_corpus_and_model_caches_follow_the_umask(tmp_path, umask, monkeypatch):
    dump = tmp_path / "dump.xml.bz2"
    _tiny_dump(dump)
    monkeypatch.setattr(defaults, "default_corpus_source", lambda: dump)
    paragraphs = defaults.default_corpus_paragraphs(cache_dir=tmp_path / "cache")
    cached = list((tmp_path / "cache" / "corpora").iterdir())
    assert len(cached) == 1 and json.loads(cached[0].read_text())["paragraphs"] == paragraphs
    assert _mode(cached[0]) == 0o666 & ~umask

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")

    def fake_convert(source: Path, out_dir: Path) -> None:  # what save_pretrained does: plain files in the folder
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))

    monkeypatch.setattr(defaults, "default_gguf_path", lambda: gguf)
    monkeypatch.setattr(defaults, "_convert_gguf", fake_convert)
    folder = defaults.default_model_path(cache_dir=tmp_path / "cache")
    assert (folder / "config.json").is_file()
    assert _mode(folder) == 0o777 & ~umask
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folder left
    # A second call finds the folder and converts nothing.
    monkeypatch.setattr(defaults, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    assert defaults.default_model_path(cache_dir=tmp_path / "cache") == folder
