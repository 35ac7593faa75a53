"""The README's quick start runs as written across batches (on the embedded default, in a
scratch folder); its first run, and that it prints nothing, is test_quiet.py's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"

# the same quick start, once per batch: training adds 1 to every weight, or fails
PRELUDE_PER_BATCH = """
import sys
import torch

torch.manual_seed(0)
initial_model = torch.nn.Linear(4, 2)
BATCH, FAIL = sys.argv[1], sys.argv[2] == "fail"
started_from = []


def train(start, params, on_metric):
    started_from.append(float(start.weight.flatten()[0]))
    if FAIL:
        raise RuntimeError("training diverged")
    with torch.no_grad():
        for p in start.parameters():
            p.add_(1.0)
    on_metric(0.1)
    return start


def evaluate(model):
    return 0.5
"""

CHECK_PER_BATCH = """
print("started from", started_from[0] - float(initial_model.weight.flatten()[0]))
"""


def test_quick_start_after_an_iteration_where_every_run_failed(tmp_path: Path) -> None:
    """Batch 1 trains, every run of batch 2 fails (the script stops with the error), batch 3
    starts from batch 1's fine-tuned model, not from the initial one (issue 17, item 2)."""
    text = README.read_text()
    section = text[text.index("## Quick start") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None and '"batch-42"' in code.group(1)
    script = tmp_path / "quickstart.py"
    script.write_text(
        PRELUDE_PER_BATCH + code.group(1).replace('"batch-42"', "BATCH") + CHECK_PER_BATCH
    )

    def run(batch: str, mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), batch, mode],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    first = run("b1", "train")
    assert first.returncode == 0 and "started from 0.0" in first.stdout, first.stderr[-3000:]
    second = run("b2", "fail")
    assert second.returncode != 0 and "training diverged" in second.stderr
    third = run("b3", "train")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "started from 1.0" in third.stdout  # batch 1's model, not the initial one
