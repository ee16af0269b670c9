"""Fixtures of the fault tests: a tiny model and dataset on disk, a launcher that runs ``python -m mi_crow`` in
killable child processes, and small tmpfs mounts for disk-full tests."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mi_crow.testing import SAMPLE_TEXTS, build_tokenizer, make_tiny_llama_model

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("cli_launcher.py")


def cli_env() -> dict[str, str]:
    """Environment of CLI runs: this checkout's mi_crow first on the path, no network, no colour codes."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", NO_COLOR="1")
    return env


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    killed: bool

    def describe(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


class CliLauncher:
    """Client of ``cli_launcher.py``: ``run(argv, kill_when=...)`` runs ``python -m mi_crow *argv`` in a child
    process and SIGKILLs it as soon as ``kill_when()`` returns True (polled every few milliseconds)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.count = 0
        self.process = subprocess.Popen([sys.executable, str(LAUNCHER)], cwd=ROOT, env=cli_env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.process.stdout.readline()
        if not ready:
            raise RuntimeError(f"the CLI launcher did not start (exit {self.process.wait()})")

    def run(self, *argv: object, kill_when: Callable[[], bool] | None = None, kill_after: float = 0.0,
            timeout: float = 240.0) -> CliResult:
        self.count += 1
        out, err = self.logdir / f"run{self.count}.out", self.logdir / f"run{self.count}.err"
        request = {"argv": [str(a) for a in argv], "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())["pid"]
        killed = False
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.process.stdout], [], [], 0.002)
            if ready:
                break
            if time.monotonic() > deadline and not killed:
                os.kill(pid, signal.SIGKILL)
                killed = True
            elif kill_when is not None and not killed and kill_when():
                if kill_after:
                    time.sleep(kill_after)
                os.kill(pid, signal.SIGKILL)
                killed = True
        done = json.loads(self.process.stdout.readline())
        assert done["pid"] == pid
        return CliResult(done["returncode"], out.read_text(errors="replace"), err.read_text(errors="replace"),
                         killed and done["returncode"] == -signal.SIGKILL)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


@pytest.fixture(scope="package")
def launcher(tmp_path_factory) -> Iterator[CliLauncher]:
    client = CliLauncher(tmp_path_factory.mktemp("cli-logs"))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="package")
def workdir(tmp_path_factory) -> Path:
    """A tiny Llama (3 blocks, width 32) saved as a HuggingFace folder and a 24-line text dataset."""
    root = tmp_path_factory.mktemp("faults")
    tok = build_tokenizer("llama")
    make_tiny_llama_model(tok).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    (root / "data.txt").write_text("\n".join(SAMPLE_TEXTS) + "\n", encoding="utf-8")
    return root


class Tmpfs:
    """A tmpfs mounted at ``path`` with ``size`` bytes; ``resize`` remounts it (contents kept)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs for the disk-full test here ({done.stderr.strip() or done.returncode})")

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[Callable[[int], Tmpfs]]:
    """``small_tmpfs(size)`` mounts a tmpfs of ``size`` bytes (root only; skipped with the reason otherwise)."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    mounts: list[Tmpfs] = []

    def make(size: int) -> Tmpfs:
        mount = Tmpfs(tmp_path / f"tmpfs{len(mounts)}", size)
        mounts.append(mount)
        return mount

    try:
        yield make
    finally:
        for mount in mounts:
            mount.unmount()


@pytest.fixture(scope="package")
def fast_tmp(tmp_path_factory) -> Iterator[Path]:
    """A scratch folder on /dev/shm when it is a writable tmpfs (the CLI fsyncs every file; on a loaded disk that
    dominates the run time and is not what these tests are about), else under pytest's tmp_path."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        root = Path(tempfile.mkdtemp(prefix="mi_crow-faults-", dir=shm))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("faults-scratch")


class Pipeline:
    """The CLI commands of the fault tests: save -> train -> concepts on the tiny Llama."""

    RUN, SAE, LAYER = "r1", "s1", "model.layers.1"
    N_TEXTS, BATCH = len(SAMPLE_TEXTS), 2  # 12 stored batches

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def save(self, store: Path) -> list[object]:
        return ["save", "--model", self.workdir / "llama", "--dataset", self.workdir / "data.txt", "--layer", "1",
                "--store", store, "--max-length", "24", "--batch-size", self.BATCH, "--run-id", self.RUN]

    def train(self, store: Path, *, resume: bool) -> list[object]:
        # 2 epochs of ~480 tokens in steps of 16: ~60 steps, a checkpoint at step 50, a record every 5 steps.
        return ["train", "--store", store, "--run-id", self.RUN, "--n-latents", "64", "--k", "4", "--epochs", "2",
                "--batch-size", "16", "--sae-id", self.SAE, "--seed", "3"] + (["--resume"] if resume else [])

    def concepts(self, store: Path) -> list[object]:
        return ["concepts", "--store", store, "--sae-id", self.SAE, "--name", "3=three", "--name", "7=seven",
                "--top-k", "5"]


def assert_ok(result: CliResult) -> None:
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.describe()


@pytest.fixture(scope="package")
def pipeline(workdir) -> Pipeline:
    return Pipeline(workdir)


@pytest.fixture(scope="package")
def reference(launcher, pipeline, fast_tmp) -> dict:
    """save -> train -> concepts without interruption, and a snapshot of the store after train."""
    root = fast_tmp / "reference"
    store = root / "store"
    assert_ok(launcher.run(*pipeline.save(store)))
    assert_ok(launcher.run(*pipeline.train(store, resume=False)))
    shutil.copytree(store, root / "after-train")
    start = time.monotonic()
    assert_ok(launcher.run(*pipeline.concepts(store)))
    return {"store": store, "after_train": root / "after-train", "concepts_wall": time.monotonic() - start}
