"""Concept files (dictionary JSON/CSV, top-text exports) are created with the umask's mode, like any file the user
writes, so collaborators on a shared filesystem can read them (issue 11, defect 3)."""

from __future__ import annotations

import os
import stat
from types import SimpleNamespace

import pytest

from mi_crow.mechanistic.sae.concepts import AutoencoderConcepts


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_concept_exports_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    concepts = AutoencoderConcepts(SimpleNamespace(n_latents=4))
    concepts.name_concept(1, "one")
    concepts.enable_text_tracking(top_k=2)
    paths = [
        concepts.dictionary.save_json(tmp_path / "dict.json"),
        concepts.dictionary.export_csv(tmp_path / "dict.csv"),
        concepts.export_top_texts_json(tmp_path / "top.json"),
        concepts.export_top_texts_csv(tmp_path / "top.csv"),
    ]
    for path in paths:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path
