"""The README's quick start runs as written (on the embedded default, in a scratch folder)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# what the quick start leaves to the reader: a model, a training loop, an evaluation
PRELUDE = """
import torch

initial_model = torch.nn.Linear(4, 2)


def train(start, params, on_metric):
    for step in range(3):
        on_metric(1.0 / (step + 1))
    return start


def evaluate(model):
    return 0.5
"""

CHECK = """
runs = mgr.get_runs(mgr.get_experiments()[0].experiment_id)
assert len(runs) == 2 and all(r.status.value == "FINISHED" for r in runs), runs
assert mgr.has_initial_model()
print("quick start ok")
"""


def test_quick_start_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    script = tmp_path / "quickstart.py"
    script.write_text(PRELUDE + code.group(1) + CHECK)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "quick start ok" in out.stdout
