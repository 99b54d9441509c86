"""Smoke test of benchmarks/checkpoint_scale.py on a tiny checkpoint: it runs and prints its table."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_checkpoint_scale_runs_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["NB_SCALE_WIDTH"] = "64"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "checkpoint_scale.py"), "--gib", "0.0001",
                        "--pairs", "msgpack:safetensors", "--dir", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| msgpack → safetensors |")]
    assert len(rows) == 1 and rows[0].rstrip().endswith("| 0 |"), p.stdout  # the conversion exited 0
    assert os.listdir(tmp_path) == []  # the scratch folder is removed
