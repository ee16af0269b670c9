"""The README's quick start is code users paste: it must run as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_quick_start_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks, "README.md has no python block"
    script = tmp_path / "quick_start.py"
    script.write_text(blocks[0])
    env = dict(os.environ, TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # It really trained and wrote into the store it made.
    assert (tmp_path / "store" / "sae_models" / "quickstart-sae" / "config.json").is_file()
    assert (tmp_path / "store" / "runs" / "quickstart-sae" / "training_history.json").is_file()
    assert "loss_recovered" in out.stdout


def test_readme_coming_from_mi_crow_runs(tmp_path):
    """The "Coming from mi-crow" block shows the documented call shapes: it must run as written too."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Coming from mi-crow", 1)
    assert len(section) == 2, "README.md has no 'Coming from mi-crow' section"
    block = re.search(r"```python\n(.*?)```", section[1], re.S)
    assert block, "the 'Coming from mi-crow' section has no python block"
    script = tmp_path / "documented.py"
    script.write_text(block.group(1))
    env = dict(os.environ, TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "store-docs" / "sae_models" / "docs-sae" / "model.pt").is_file()
    assert "{0: 1.5}" in out.stdout
