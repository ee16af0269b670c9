"""The installed package: version, console entry point, subcommands, import hygiene."""

import subprocess
import sys

import mi_crow


def test_version_is_set() -> None:
    assert isinstance(mi_crow.__version__, str) and mi_crow.__version__.count(".") == 2


def test_console_entry_lists_every_subcommand() -> None:
    out = subprocess.run([sys.executable, "-m", "mi_crow", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("layers", "save", "train", "concepts", "report", "generate", "demo"):
        assert command in out.stdout
    assert "mi-crow" in out.stdout


def test_report_and_defaults_import_without_transformers() -> None:
    # The report and the defaults' corpus parser are usable without loading a model stack.
    code = ("import sys, mi_crow.report, mi_crow.defaults; "
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
