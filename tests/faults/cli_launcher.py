"""Runs ``python -m mi_crow <args>`` in forked child processes, so each run skips the interpreter's import time.

Started once per test module with ``sys.executable``. It imports the heavy libraries (torch, transformers) without
running anything, then serves requests, one JSON object per line on stdin:

    {"argv": ["save", "--model", ...], "stdout": "/path/out.txt", "stderr": "/path/err.txt"}

For each it forks; the child redirects stdout/stderr to the given files and runs the ``mi_crow`` package's
``__main__`` exactly as ``python -m mi_crow`` does (``runpy.run_module(..., alter_sys=True)``). The launcher answers
``{"pid": <child pid>}`` at once (so the test can SIGKILL the child) and ``{"pid": ..., "returncode": ...}`` when the
child has ended (negative: killed by that signal), reaping it.

Forking is safe here: the launcher has run no torch operation, so it has no thread pools to lose in the child.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import traceback

import torch  # noqa: F401 - imported for the children
import torch._dynamo  # noqa: F401 - the optimizer imports it on first use (seconds)
import transformers  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401


def _child(request: dict) -> None:
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["mi_crow", *request["argv"]]
    code = 1
    try:
        runpy.run_module("mi_crow", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - an uncaught error of the CLI, reported like the interpreter does
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def main() -> None:
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
