"""A store on a filesystem that runs out of space: a clear error naming the file and "no space left", every batch
completed before it stays readable, no temporary files are left taking space, and after freeing space the same
command continues. The filesystem is a small tmpfs (mounting one needs root; skipped with the reason otherwise)."""

from __future__ import annotations

import errno

import pytest
import torch

from mi_crow.errors import MiCrowError, StoreError
from mi_crow.store import LocalStore, StoreWriteError

from .conftest import Pipeline

RUN, LAYER = Pipeline.RUN, Pipeline.LAYER


def _batch(index: int):
    g = torch.Generator().manual_seed(index)
    acts = torch.randn(4, 16, 128, generator=g)  # 32 KiB of activations per batch
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[index % 4, 10:] = 0
    return {LAYER: acts}, mask


def _temporaries(root) -> list[str]:
    return sorted(str(p) for p in root.rglob("*.tmp"))


def test_store_on_a_full_filesystem_fails_clearly_and_keeps_complete_batches(small_tmpfs):
    mount = small_tmpfs(256 * 1024)
    store = LocalStore(mount.path / "store", fsync=True)
    written = {}
    with pytest.raises(StoreWriteError) as info:
        for index in range(100):
            acts, mask = _batch(index)
            store.write_activation_batch(RUN, index, acts, mask, extra={"input_ids": mask * index})
            written[index] = (acts, mask)
    error = info.value
    assert isinstance(error, StoreError) and isinstance(error, MiCrowError) and isinstance(error, OSError)
    message = str(error)
    assert "no space left on device" in message and str(mount.path / "store" / "activations" / RUN) in message
    failed = len(written)
    assert failed >= 2, "the filesystem filled up before two batches; make it larger"
    # Every batch completed before the failure is listed and reads back exactly; the failed one is not listed.
    assert store.list_run_batches(RUN) == list(range(failed))
    for index, (acts, mask) in written.items():
        batch = store.get_run_batch(RUN, index)
        assert torch.equal(batch.activations[LAYER], acts[LAYER]) and torch.equal(batch.attention_mask, mask)
    assert store.get_run_metadata(RUN)["batch_count"] == failed
    # Cut-short writes leave nothing behind, and the run is not left locked.
    assert _temporaries(mount.path) == []
    assert not (mount.path / "store" / "activations" / RUN / ".lock").exists()

    # Other writers report the same error, naming their file.
    big = torch.zeros(200_000)
    with pytest.raises(StoreWriteError, match=r"no space left on device writing .*sae_models/x/model\.pt"):
        store.put_torch("sae_models/x/model.pt", {"w": big})
    with pytest.raises(StoreWriteError, match=r"no space left on device writing .*runs/x/history\.json"):
        store.put_json("runs/x/history.json", list(range(100_000)))
    assert _temporaries(mount.path) == []

    # Freeing space lets the same writes continue where they stopped.
    mount.resize(4 * 1024 * 1024)
    for index in range(failed, failed + 3):
        acts, mask = _batch(index)
        store.write_activation_batch(RUN, index, acts, mask)
        written[index] = (acts, mask)
    assert store.list_run_batches(RUN) == sorted(written)


def test_atomic_write_reports_a_full_disk_with_enospc(small_tmpfs):
    from mi_crow.store import atomic_write, atomic_write_bytes

    mount = small_tmpfs(64 * 1024)
    target = mount.path / "report.html"
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 200_000)
    assert info.value.errno == errno.ENOSPC and str(target) in str(info.value)
    # A writer that reports the full disk in its own words (torch.save's stream-position check) is recognised too.
    with pytest.raises(OSError) as info:
        atomic_write(mount.path / "m.pt", lambda tmp: torch.save(torch.zeros(100_000), tmp))
    assert info.value.errno == errno.ENOSPC and "m.pt" in str(info.value)
    assert list(mount.path.iterdir()) == []


def test_cli_save_on_a_full_filesystem_then_resumed(launcher, pipeline, reference, small_tmpfs):
    ref = LocalStore(reference["store"])
    ref_bytes = sum(p.stat().st_size for p in (reference["store"] / "activations").rglob("*") if p.is_file())
    mount = small_tmpfs(max(64 * 1024, (ref_bytes // 2) // 4096 * 4096))
    store_path = mount.path / "store"
    result = launcher.run(*pipeline.save(store_path))
    message = result.stderr
    assert result.returncode == 2, result.describe()  # a store error is the user's to fix: one line, status 2
    assert "Traceback" not in message and "no space left on device" in message
    assert str(store_path / "activations" / RUN) in message
    store = LocalStore(store_path)
    complete = store.list_run_batches(RUN)
    assert complete == list(range(len(complete))) and len(complete) >= 1
    for index in complete:
        a, b = ref.get_run_batch(RUN, index), store.get_run_batch(RUN, index)
        assert torch.equal(a.activations[LAYER], b.activations[LAYER])
        assert torch.equal(a.attention_mask, b.attention_mask)
    assert _temporaries(mount.path) == []

    mount.resize(16 * 1024 * 1024)
    resumed = launcher.run(*pipeline.save(store_path))
    assert resumed.returncode == 0, resumed.describe()
    assert store.get_run_metadata(RUN) == ref.get_run_metadata(RUN)
    for index in ref.list_run_batches(RUN):
        assert torch.equal(ref.get_run_batch(RUN, index).activations[LAYER],
                           store.get_run_batch(RUN, index).activations[LAYER])
