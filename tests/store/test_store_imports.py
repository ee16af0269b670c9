"""The store and the datasets package stay light: importing them pulls in neither transformers nor datasets."""

import subprocess
import sys


def test_store_and_datasets_import_without_heavy_dependencies():
    code = ("import sys, mi_crow.store, mi_crow.datasets; "
            "print(sorted(m for m in ('transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
