"""Cross-process lock files for runs: one writer per activation run or training run at a time.

A lock is a small JSON file (``activations/<run_id>/.lock``, ``runs/<run_id>/.lock``) that records who holds it:
pid, hostname, start time, the kernel's boot id and the process's own start time. Why a file and not only
``fcntl.flock``:

* It is created atomically with ``link(2)`` from a complete temporary file (``O_CREAT | O_EXCL`` where hard links are
  not supported), which is atomic on NFS as well, where ``flock`` is emulated or, with ``nolock`` mounts, local to
  one machine.
* A person who finds a run locked can read who holds it.

The price is that the kernel does not drop the lock when its holder dies. A lock is **stale** — and is taken over
with a logged warning — when its holder ran on this host and is gone: its pid does not exist, is a zombie, or now
belongs to a process that started at another time (the pid was reused), or the machine has rebooted since (the boot
id differs). A lock held from another host cannot be checked from here; the error says so and names the file to
delete once that process is known to be gone. Taking over is serialised between the processes of one host with
``flock`` on the run's folder, so two processes that find the same stale lock never both take it.

Locks are re-entrant within a process (the activation writer thread writes batches while the saving thread holds
the run's lock); a forked child does not inherit its parent's locks.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from mi_crow.errors import ResourceBusyError
from mi_crow.store.atomic import TMP_SUFFIX, is_no_space_error
from mi_crow.store.errors import StoreWriteError

try:  # POSIX only; on Windows stale locks are taken over without the flock serialisation.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LockHolder", "RunLock", "current_holder", "held_by_this_process"]

logger = logging.getLogger(__name__)

_LOCK_FORMAT = 1


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as recorded in the lock file.

    Attributes:
        pid: process id of the holder.
        hostname: host the holder runs on.
        started: when the lock was taken (ISO 8601, local time with offset).
        boot_id: the holder's kernel boot id (Linux), ``""`` if unknown.
        process_start: the holder's start time in clock ticks since boot (Linux), ``None`` if unknown.
        purpose: what the holder is doing (``"activations.save"``, ``"training"``...).
        command: the holder's command line, shortened.
        token: random id of this particular acquisition.
    """

    pid: int
    hostname: str
    started: str
    boot_id: str = ""
    process_start: int | None = None
    purpose: str = ""
    command: str = ""
    token: str = ""

    def describe(self) -> str:
        """One line for error messages: ``pid 123 on host h since 2024-... (training: python -m mi_crow train)``."""
        what = f" ({self.purpose}: {self.command})" if self.purpose or self.command else ""
        return f"pid {self.pid} on host {self.hostname!r} since {self.started}{what}"


def _read_proc(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError:
        return None


def _boot_id() -> str:
    return (_read_proc("/proc/sys/kernel/random/boot_id") or "").strip()


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a process from ``/proc/<pid>/stat``, or None."""
    text = _read_proc(f"/proc/{pid}/stat")
    if not text:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')': split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _me(purpose: str) -> LockHolder:
    stat = _proc_stat(os.getpid())
    return LockHolder(
        pid=os.getpid(),
        hostname=socket.gethostname(),
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        boot_id=_boot_id(),
        process_start=stat[1] if stat else None,
        purpose=purpose,
        command=" ".join(sys.argv)[:200],
        token=secrets.token_hex(8),
    )


def _parse_holder(text: str) -> LockHolder | None:
    try:
        data = json.loads(text)
        return LockHolder(
            pid=int(data["pid"]),
            hostname=str(data["hostname"]),
            started=str(data.get("started", "?")),
            boot_id=str(data.get("boot_id", "")),
            process_start=None if data.get("process_start") is None else int(data["process_start"]),
            purpose=str(data.get("purpose", "")),
            command=str(data.get("command", "")),
            token=str(data.get("token", "")),
        )
    except (ValueError, TypeError, KeyError):
        return None


def current_holder(path: str | os.PathLike[str]) -> LockHolder | None:
    """The holder recorded in lock file ``path``, or ``None`` when there is no lock (or it cannot be parsed)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    return _parse_holder(text)


def _holder_gone(holder: LockHolder) -> str | None:
    """Why ``holder`` is known to be gone (a reason for the log), or None if it may still be running."""
    if holder.hostname != socket.gethostname():
        return None
    boot = _boot_id()
    if holder.boot_id and boot and holder.boot_id != boot:
        return "the machine has rebooted since"
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"process {holder.pid} no longer exists"
    except PermissionError:
        pass  # exists, owned by another user
    stat = _proc_stat(holder.pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):
            return f"process {holder.pid} has exited"
        if holder.process_start is not None and start != holder.process_start:
            return f"pid {holder.pid} now belongs to another process"
    return None


class _Held:
    """This process's hold on one lock file (shared by every thread, counted for re-entry)."""

    def __init__(self, holder: LockHolder) -> None:
        self.holder = holder
        self.count = 1


_registry: dict[str, _Held] = {}
_registry_lock = threading.Lock()


class RunLock:
    """A lock file that one process at a time may hold; use as a context manager.

    ``with RunLock(path, what="activation run 'r1'"):`` takes the lock (or raises
    :class:`~mi_crow.errors.ResourceBusyError`) and removes the file on exit, also when the block raises.
    Re-entrant within a process.

    Args:
        path: the lock file (its folder is created if needed).
        what: what the lock protects, for messages (``"activation run 'r1'"``).
        purpose: what the holder does, recorded in the file (``"activations.save"``).
        timeout: seconds to wait for a busy lock before giving up (0: fail at once).
        poll: seconds between attempts while waiting.
    """

    def __init__(self, path: str | os.PathLike[str], *, what: str = "", purpose: str = "", timeout: float = 0.0,
                 poll: float = 0.1) -> None:
        self.path = Path(path).absolute()
        self.what = what or str(self.path.parent)
        self.purpose = purpose
        self.timeout = float(timeout)
        self.poll = float(poll)
        self._acquired = False

    def __repr__(self) -> str:
        return f"RunLock({str(self.path)!r}, held={self._acquired})"

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._acquired

    def acquire(self) -> RunLock:
        """Take the lock, waiting up to ``timeout`` seconds; returns ``self``.

        Raises:
            ResourceBusyError: another live process holds it (the message names its pid, host and the lock file).
        """
        if self._acquired:
            raise RuntimeError(f"{self!r} is already acquired; use one RunLock object per with-block")
        key = str(self.path)
        with _registry_lock:
            held = _registry.get(key)
            if held is not None and held.holder.pid == os.getpid():
                held.count += 1
                self._acquired = True
                return self
        deadline = time.monotonic() + max(self.timeout, 0.0)
        me = _me(self.purpose)
        while True:
            if self._try_create(me):
                with _registry_lock:
                    _registry[key] = _Held(me)
                self._acquired = True
                return self
            holder = current_holder(self.path)
            if holder is None:
                if not self.path.exists():
                    continue  # released between our attempt and the read: try again at once
                # Unreadable: being written by a filesystem without hard links, or left half-written by a crash.
                if self._unreadable_is_old():
                    self._take_over(None, "the lock file is unreadable and older than a minute")
                    continue
                if time.monotonic() >= deadline:
                    raise ResourceBusyError(f"{self.what} is locked: lock file {self.path} exists but is unreadable; "
                                            "delete it if no process is writing this run")
                time.sleep(self.poll)
                continue
            reason = _holder_gone(holder)
            if reason is not None:
                self._take_over(holder, reason)
                continue
            if time.monotonic() >= deadline:
                raise ResourceBusyError(self._busy_message(holder))
            time.sleep(self.poll)

    def release(self) -> None:
        """Give the lock back (the file is removed when the outermost hold in this process ends)."""
        if not self._acquired:
            return
        self._acquired = False
        key = str(self.path)
        with _registry_lock:
            held = _registry.get(key)
            if held is None or held.holder.pid != os.getpid():
                return
            held.count -= 1
            if held.count > 0:
                return
            del _registry[key]
        recorded = current_holder(self.path)
        if recorded is None:
            return  # the run was deleted while locked, say
        if recorded.token != held.holder.token:
            logger.warning("lock %s was taken over by %s while this process held it", self.path, recorded.describe())
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _busy_message(self, holder: LockHolder) -> str:
        here = socket.gethostname()
        if holder.hostname == here:
            hint = "wait for it to finish, or stop it; the lock is removed when it ends"
        else:
            hint = (f"it runs on another host, so this process ({here!r}) cannot check it; once it is known to be "
                    f"gone, delete {self.path}")
        return f"{self.what} is locked by {holder.describe()}: lock file {self.path}; {hint}"

    def _try_create(self, me: LockHolder) -> bool:
        """Create the lock file holding ``me``'s record; False when it already exists."""
        try:
            return self._create(me)
        except OSError as exc:
            if is_no_space_error(exc):
                raise StoreWriteError(f"no space left on device creating the lock file {self.path}") from exc
            raise

    def _create(self, me: LockHolder) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"format": _LOCK_FORMAT, **me.__dict__}, indent=1).encode("utf-8")
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            os.write(fd, record)
        finally:
            os.close(fd)
        try:
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return False
            except OSError:
                # NFS may report an error for a link that did succeed: the link count tells. Filesystems without
                # hard links fall back to an exclusive create.
                try:
                    if os.stat(tmp).st_nlink == 2:
                        return True
                except OSError:
                    pass
                return self._create_exclusive(record)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _create_exclusive(self, record: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        try:
            os.write(fd, record)
        finally:
            os.close(fd)
        return True

    def _unreadable_is_old(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime > 60.0
        except OSError:
            return False

    def _take_over(self, stale: LockHolder | None, reason: str) -> None:
        """Remove the stale lock file, provided it still holds the same record (another process may have been
        quicker)."""
        folder_fd = None
        if fcntl is not None:
            try:
                folder_fd = os.open(self.path.parent, os.O_RDONLY)
                fcntl.flock(folder_fd, fcntl.LOCK_EX)
            except OSError:
                if folder_fd is not None:
                    os.close(folder_fd)
                folder_fd = None
        try:
            now = current_holder(self.path)
            if now != stale:
                return  # released, or already taken over by someone else: just try again
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                return
            who = stale.describe() if stale is not None else "an unknown holder"
            logger.warning("%s: removed the stale lock %s of %s (%s)", self.what, self.path, who, reason)
            if stale is not None and stale.hostname == socket.gethostname():
                self._remove_temporaries_of(stale.pid)
        finally:
            if folder_fd is not None:
                fcntl.flock(folder_fd, fcntl.LOCK_UN)
                os.close(folder_fd)

    def _remove_temporaries_of(self, pid: int) -> None:
        """Delete the temporary files that the dead holder ``pid`` left in the locked folder (writes cut short by the
        crash). Their names carry the writer's pid (see :mod:`mi_crow.store.atomic`), so live writers' files stay."""
        removed = 0
        for tmp in self.path.parent.rglob(f".*.{pid}-*{TMP_SUFFIX}"):
            try:
                tmp.unlink()
                removed += 1
            except OSError:
                pass
        if removed:
            logger.info("%s: removed %d temporary files left by process %d", self.what, removed, pid)

    def __del__(self) -> None:  # a lock object dropped without release must not keep the run locked
        try:
            self.release()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


def held_by_this_process(path: str | os.PathLike[str]) -> bool:
    """Whether this process holds the lock file ``path`` through a :class:`RunLock`."""
    with _registry_lock:
        held = _registry.get(str(Path(path).absolute()))
        return held is not None and held.holder.pid == os.getpid()
