"""benchmarks/user_time.py --smoke times the real command line on a phantom and writes its table.

Only the machinery is checked; the times themselves are never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_times_the_command_line_and_writes_markdown_and_json(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "user_time.py"), "--smoke",
         "--out", str(tmp_path), "--tag", "smoke"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (results_file,) = tmp_path.glob("*-user-time-smoke.json")
    results = json.loads(results_file.read_text())
    (row,) = results["runs"]
    assert row["preset"] == "fast"
    assert row["version"] == "this"
    assert row["total_s"] >= row["engine_s"] > 0
    assert set(row["stages_s"]) >= {"affine_s", "network_s", "optimisation_s", "outputs_s"}
    assert row["bytes_written"] > 0
    assert row["peak_rss_mb"] > 0
    # A machine without a GPU: --device auto ran on the CPU, and the files say so.
    assert row["device"] == results["machine"]["device"] == "cpu"
    markdown = results_file.with_suffix(".md").read_text()
    assert "| phantom 0 | fast | this |" in markdown
    assert "; device cpu;" in markdown
