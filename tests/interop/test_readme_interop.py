"""The README's "Other libraries' formats" example must run as written (executed in-process: it needs no model)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_formats_example_runs(tmp_path, monkeypatch):
    section = (ROOT / "README.md").read_text().split("## Other libraries' formats", 1)
    assert len(section) == 2, "README.md has no 'Other libraries' formats' section"
    block = re.search(r"```python\n(.*?)```", section[1].split("\n## ", 1)[0], re.S)
    assert block, "the section has no python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    exec(compile(block.group(1), "README.md (Other libraries' formats)", "exec"), {"__name__": "__main__"})
