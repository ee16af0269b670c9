import subprocess
import sys


def test_console_entry_runs():
    out = subprocess.run([sys.executable, "-m", "mi_crow", "--help"], capture_output=True, text=True)
    assert "mi-crow" in (out.stdout + out.stderr)
