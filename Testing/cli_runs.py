"""Running the ``normative-anomaly`` command line as a subprocess, and checking what it wrote: shared
by the tests of every layer that drive the CLI (the test suite's root is on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from NormativeAnomalyLib.run_folder import OUTPUT_FILES

REPO = Path(__file__).resolve().parents[1]
LIBRARY_ROOT = REPO / "NormativeAnomaly"
STAGES = ("registration", "model_space", "inference", "scoring", "to_input_grid", "segmentation", "total")


def run_cli(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    """``normative-anomaly ARGS`` in a fresh interpreter, without installation."""
    env = dict(os.environ, PYTHONPATH=str(LIBRARY_ROOT))
    return subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr, result.stderr


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``, by relative path."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def read_json(path: Path):
    return json.loads(path.read_text())


def assert_complete_outputs(out: Path) -> dict:
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a staging folder was left behind"
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = read_json(out / "run.json")
    assert summary["outputs"] == list(OUTPUT_FILES)
    assert set(STAGES) <= set(summary["seconds"])
    assert all(summary["seconds"][stage] >= 0 for stage in STAGES)
    assert summary["seconds"]["total"] == pytest.approx(
        sum(summary["seconds"][s] for s in STAGES if s != "total"), abs=0.01)
    return summary
