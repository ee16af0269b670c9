#!/usr/bin/env bash
# Runs the test suite with the compiled path required: a missing mi_crow._C is an error, not a fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
export MI_CROW_REQUIRE_EXTENSION=1
exec .venv/bin/python -m pytest -q -ra "$@"
