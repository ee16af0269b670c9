"""One writer per run: lock files taken by real processes, refused second writers, stale-lock recovery, release on
exceptions. Holders are separate processes (forked with multiprocessing, or a fresh interpreter)."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mi_crow.errors import ResourceBusyError
from mi_crow.store import LocalStore, RunLock
from mi_crow.store.lock import _proc_stat, current_holder

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="holder processes are forked; liveness uses /proc")

ROOT = Path(__file__).resolve().parents[2]
LAYER = "model.layers.0"
CTX = multiprocessing.get_context("fork")


def _hold(base: str, run_id: str, kind: str, locked, release) -> None:
    store = LocalStore(base, fsync=False)
    with store.lock_run(run_id, kind=kind, purpose="test-holder"):
        locked.set()
        release.wait(60)


class Holder:
    """A forked process holding ``store.lock_run(run_id, kind)`` until released or killed."""

    def __init__(self, store: LocalStore, run_id: str, kind: str = "activations") -> None:
        self.locked, self.release = CTX.Event(), CTX.Event()
        self.process = CTX.Process(target=_hold, args=(str(store.base_path), run_id, kind, self.locked, self.release))
        self.process.start()
        assert self.locked.wait(30), "the holder process never took the lock"

    @property
    def pid(self) -> int:
        return self.process.pid


def _batch():
    return {LAYER: torch.randn(2, 3, 4)}, torch.ones(2, 3, dtype=torch.long)


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", fsync=False)


def test_second_writer_is_refused_naming_the_holder(store: LocalStore, tiny_gpt2, sample_texts):
    lock_path = store.base_path / "activations" / "r" / ".lock"
    holder = Holder(store, "r")
    try:
        recorded = json.loads(lock_path.read_text())
        assert recorded["pid"] == holder.pid and recorded["hostname"] == socket.gethostname()
        assert recorded["purpose"] == "test-holder" and recorded["started"]

        refused = [
            lambda: store.lock_run("r").__enter__(),
            lambda: store.write_activation_batch("r", 0, *_batch()),
            lambda: store.write_run_meta("r", {"model_id": "x"}),
            lambda: store.delete_run("r"),
            lambda: tiny_gpt2.activations.save(sample_texts[:4], 1, run_id="r", batch_size=2, progress=False),
        ]
        for call in refused:
            with pytest.raises(ResourceBusyError) as info:
                call()
            message = str(info.value)
            assert f"pid {holder.pid}" in message and str(lock_path) in message and "activation run 'r'" in message
            assert isinstance(info.value, BlockingIOError)
        # Nothing was written into the run, and the holder's lock is intact.
        assert not store.run_exists("r") and store.list("activations/r") == []
        assert current_holder(lock_path).pid == holder.pid
        # Another run and the training run of the same name are separate locks.
        store.write_activation_batch("other", 0, *_batch())
        with store.lock_run("r", kind="training"):
            assert (store.base_path / "runs" / "r" / ".lock").is_file()
    finally:
        holder.release.set()
        holder.process.join(30)
    assert holder.process.exitcode == 0 and not lock_path.exists()
    # Once released, the same save goes through.
    run_id = tiny_gpt2.activations.save(sample_texts[:4], 1, run_id="r", batch_size=2, progress=False)
    assert store.list_run_batches(run_id) == [0, 1] and not lock_path.exists()


def test_training_lock_refuses_a_second_trainer(store: LocalStore):
    holder = Holder(store, "sae1", kind="training")
    try:
        with pytest.raises(ResourceBusyError, match=rf"training run 'sae1' is locked by pid {holder.pid} .*"
                                                    rf"{store.base_path}/runs/sae1/\.lock"):
            with store.lock_run("sae1", kind="training"):
                pass
        store.write_activation_batch("sae1", 0, *_batch())  # the activation run of that name is not locked
    finally:
        holder.release.set()
        holder.process.join(30)


def test_waiting_for_a_busy_lock_gets_it_once_released(store: LocalStore):
    holder = Holder(store, "r")
    lock = store.lock_run("r", timeout=30)
    holder.release.set()  # released while we wait
    with lock:
        assert current_holder(lock.path).pid == os.getpid()
    holder.process.join(30)


def test_stale_lock_of_a_killed_process_is_taken_over_with_a_warning(store: LocalStore, caplog):
    lock_path = store.base_path / "activations" / "r" / ".lock"
    holder = Holder(store, "r")
    os.kill(holder.pid, signal.SIGKILL)
    # Not reaped yet: the dead holder is a zombie, whose pid still answers kill(pid, 0).
    for _ in range(200):
        stat = _proc_stat(holder.pid)
        if stat is None or stat[0] == "Z":
            break
        time.sleep(0.05)
    assert lock_path.exists() and current_holder(lock_path).pid == holder.pid
    with caplog.at_level(logging.WARNING, logger="mi_crow.store.lock"):
        store.write_activation_batch("r", 0, *_batch())
    assert store.list_run_batches("r") == [0] and not lock_path.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"pid {holder.pid}" in warnings[0] and "stale lock" in warnings[0]
    assert str(lock_path) in warnings[0]
    holder.process.join(30)


def test_stale_lock_of_a_reaped_process_is_taken_over(store: LocalStore, caplog):
    holder = Holder(store, "r", kind="training")
    holder.process.kill()
    holder.process.join(30)
    assert holder.process.exitcode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="mi_crow.store.lock"):
        with store.lock_run("r", kind="training") as lock:
            assert current_holder(lock.path).pid == os.getpid()
    assert any(f"process {holder.pid} no longer exists" in r.getMessage() for r in caplog.records)


def test_lock_is_released_when_the_holder_raises(store: LocalStore, caplog):
    """A fresh interpreter takes the lock and raises inside the block: the file is gone, no takeover needed."""
    code = ("import sys\nfrom mi_crow.store import LocalStore\n"
            "store = LocalStore(sys.argv[1], fsync=False)\n"
            "with store.lock_run('r', purpose='crashy'):\n"
            "    raise RuntimeError('boom inside the lock')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code, str(store.base_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "boom inside the lock" in done.stderr
    assert not (store.base_path / "activations" / "r" / ".lock").exists()
    with caplog.at_level(logging.WARNING, logger="mi_crow.store.lock"):
        store.write_activation_batch("r", 0, *_batch())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_lock_is_released_on_exception_in_this_process(store: LocalStore):
    with pytest.raises(KeyError):
        with store.lock_run("r"):
            raise KeyError("x")
    assert not (store.base_path / "activations" / "r" / ".lock").exists()


def test_reentrant_within_a_process_and_held_across_threads(store: LocalStore):
    lock_path = store.base_path / "activations" / "r" / ".lock"
    with store.lock_run("r", purpose="outer"):
        # write_activation_batch takes the same lock again (the saving thread already holds it).
        store.write_activation_batch("r", 0, *_batch())
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:  # the activation writer thread of lm.activations.save
            pool.submit(store.write_activation_batch, "r", 1, *_batch()).result()
        assert current_holder(lock_path).purpose == "outer"
    assert not lock_path.exists() and store.list_run_batches("r") == [0, 1]


def _try_lock(base: str, queue) -> None:
    try:
        with LocalStore(base, fsync=False).lock_run("r"):
            queue.put("acquired")
    except ResourceBusyError as exc:
        queue.put(str(exc))


def test_a_forked_child_does_not_inherit_the_lock(store: LocalStore):
    queue = CTX.Queue()
    with store.lock_run("r"):
        child = CTX.Process(target=_try_lock, args=(str(store.base_path), queue))
        child.start()
        answer = queue.get(timeout=30)
        child.join(30)
    assert answer != "acquired" and f"pid {os.getpid()}" in answer


def _write_record(path: Path, **fields) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "hostname": socket.gethostname(), "started": "2020-01-01T00:00:00+0000",
              "boot_id": "", "process_start": None, "purpose": "fake", "command": "", "token": "t"}
    record.update(fields)
    path.write_text(json.dumps(record))


def test_lock_from_another_host_is_not_touched(store: LocalStore):
    lock_path = store.base_path / "activations" / "r" / ".lock"
    _write_record(lock_path, pid=1, hostname="some-other-host")
    with pytest.raises(ResourceBusyError, match=r"pid 1 on host 'some-other-host'.*another host.*delete"):
        store.write_activation_batch("r", 0, *_batch())
    assert current_holder(lock_path).hostname == "some-other-host"


@pytest.mark.parametrize("case", ["pid reused", "rebooted"])
def test_lock_of_a_live_pid_from_another_process_life_is_stale(store: LocalStore, case, caplog):
    lock_path = store.base_path / "runs" / "r" / ".lock"
    parent = os.getppid()  # alive for the whole test
    start = _proc_stat(parent)[1]
    if case == "pid reused":
        _write_record(lock_path, pid=parent, process_start=start + 12345)
        reason = "now belongs to another process"
    else:
        _write_record(lock_path, pid=parent, process_start=start, boot_id="an-earlier-boot")
        reason = "rebooted"
    with caplog.at_level(logging.WARNING, logger="mi_crow.store.lock"):
        with store.lock_run("r", kind="training"):
            pass
    assert any(reason in r.getMessage() for r in caplog.records)
    # The same record with the right start time and boot is a live holder.
    _write_record(lock_path, pid=parent, process_start=start, boot_id=(Path("/proc/sys/kernel/random/boot_id")
                                                                        .read_text().strip()))
    with pytest.raises(ResourceBusyError, match=f"pid {parent}"):
        with store.lock_run("r", kind="training"):
            pass


def test_unreadable_lock_file_is_busy_until_old(store: LocalStore, caplog):
    lock_path = store.base_path / "activations" / "r" / ".lock"
    lock_path.parent.mkdir(parents=True)
    lock_path.write_text("{half a rec")
    with pytest.raises(ResourceBusyError, match=r"unreadable"):
        store.write_activation_batch("r", 0, *_batch())
    old = time.time() - 3600
    os.utime(lock_path, (old, old))
    with caplog.at_level(logging.WARNING, logger="mi_crow.store.lock"):
        store.write_activation_batch("r", 0, *_batch())
    assert store.list_run_batches("r") == [0]
    assert any("unreadable" in r.getMessage() for r in caplog.records)


def test_lock_files_are_not_part_of_the_store_content(store: LocalStore):
    with store.lock_run("r"):
        store.write_activation_batch("r", 0, *_batch())
        assert all(".lock" not in key for key in store.list())
        assert store.list_runs() == ["r"]


def test_run_lock_needs_a_fresh_object_per_block(tmp_path):
    lock = RunLock(tmp_path / ".lock")
    with lock:
        with pytest.raises(RuntimeError, match="already acquired"):
            lock.acquire()
    assert not (tmp_path / ".lock").exists()
