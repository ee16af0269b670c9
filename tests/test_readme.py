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
