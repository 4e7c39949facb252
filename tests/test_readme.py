"""The README's Python example runs as written (from a folder that has the checkout's assets/)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("From Python (these lines run as written", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                       env={"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "red_flower_x4.png").is_file() and r.stdout.strip().endswith("[2, 2]")  # the two examples share a size: one batch
