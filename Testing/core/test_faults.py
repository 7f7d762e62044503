"""Faults while writing: two runs into one folder, a run killed while it writes its outputs, a
write that fails half-way. Each leaves either the previous outputs or the complete new set."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runs import LIBRARY_ROOT, assert_ok, run_cli, snapshot

from NormativeAnomalyLib.lesions import segment_anomalies
from NormativeAnomalyLib.run_folder import OUTPUT_FILES, output_lock

pytestmark = pytest.mark.reliability

FAST = ("--model", "intensity-t1", "--registered", "--quiet")  # the template itself: no registration needed


def _hold_lock(out: Path) -> subprocess.Popen:
    """Another process holding the output lock of ``out`` (as a run does while it computes)."""
    code = ("import sys, time; from NormativeAnomalyLib.run_folder import output_lock\n"
            f"with output_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, encoding="utf-8",
                              env=dict(os.environ, PYTHONPATH=str(LIBRARY_ROOT)))
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.mark.slow
def test_second_run_into_the_same_folder_is_refused(tmp_path, template_t1_path, reliability_case):
    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        before = snapshot(tmp_path)
        result = run_cli("run", template_t1_path, "--out", out, *FAST)
        assert result.returncode == 1
        message = result.stderr.strip()
        assert "another run" in message and f"process {holder.pid}" in message and "\n" not in message
        assert snapshot(tmp_path) == before
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    assert_ok(run_cli("run", template_t1_path, "--out", out, *FAST))  # the dead holder's lock went with it
    assert not any(path.name.endswith(".lock") for path in tmp_path.iterdir())
    reliability_case("fault", "two runs at once into the same --out", f"the second: exit 1: {message}; after the "
                     "first was killed (SIGKILL), a new run went ahead: no stale lock")


def test_lock_is_exclusive_in_process_too(tmp_path):
    """Python front ends (web app, scripts) that run in-process use the same lock."""
    from NormativeAnomalyLib.errors import OutputError

    with output_lock(tmp_path / "out"):
        with pytest.raises(OutputError, match="another run"):
            with output_lock(tmp_path / "out"):
                pass
    with output_lock(tmp_path / "out"):  # released: free again
        pass


def _outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUT_FILES if (out / name).exists()}


@pytest.mark.slow
def test_run_killed_while_writing_leaves_old_or_new_complete_set(tmp_path, template_t1_path, reliability_case):
    """SIGKILL (no clean-up possible) at the moment the run starts writing, over a previous result
    with --overwrite: the folder holds the previous set or the new one, each complete."""
    out = tmp_path / "out"
    assert_ok(run_cli("run", template_t1_path, "--out", out, *FAST))
    previous = _outputs(out)
    env = dict(os.environ, PYTHONPATH=str(LIBRARY_ROOT))
    run = subprocess.Popen([sys.executable, "-m", "NormativeAnomalyLib.cli", "run", str(template_t1_path),
                            "--out", str(out), "--overwrite", "--fpr", "0.05", "--progress-lines", *FAST], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace", env=env)
    for line in run.stdout:
        if "writing" in line:
            run.send_signal(signal.SIGKILL)
            break
    run.wait(timeout=300)
    assert run.returncode == -signal.SIGKILL
    now = _outputs(out)
    assert set(now) == set(OUTPUT_FILES)  # never a partial set
    summary = json.loads(now["run.json"])  # and never a half-written file
    state = "previous" if now == previous else "new"
    if state == "new":
        assert summary["threshold_healthy_fpr"] == pytest.approx(0.05)
    reliability_case("fault", "run killed (SIGKILL) as it starts writing over a previous result (--overwrite)",
                     f"the folder held the {state} complete set; no half-written file")


def test_failed_write_keeps_the_previous_outputs(tmp_path, monkeypatch, template_t1_path, reliability_case):
    """The disk fills up (OSError) while the report is written: the earlier outputs stay as they were."""
    from NormativeAnomalyLib import outputs
    from NormativeAnomalyLib.errors import NormativeAnomalyError
    from NormativeAnomalyLib.models import resolve_model
    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
    from NormativeAnomalyLib.volume_io import read_volume

    result = detect_anomalies(read_volume(template_t1_path), resolve_model("intensity-t1"), RunOptions(registered=True))
    out = tmp_path / "out"
    outputs.write_outputs(result, out)
    before = snapshot(tmp_path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs, "write_report", disk_full)
    with pytest.raises((OSError, NormativeAnomalyError)) as error:
        outputs.write_outputs(result, out, overwrite=True)
    assert snapshot(tmp_path) == before  # previous set intact, no staging folder left
    reliability_case("fault", "disk full while writing the outputs (over a previous result)",
                     f"the run failed ({error.value}); the previous outputs byte-identical, no staging folder left")


def _intensity_result(template_t1_path: Path):
    from NormativeAnomalyLib.models import resolve_model
    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
    from NormativeAnomalyLib.volume_io import read_volume

    return detect_anomalies(read_volume(template_t1_path), resolve_model("intensity-t1"), RunOptions(registered=True))


@pytest.mark.slow
def test_overwrite_over_a_folder_named_like_an_output_is_refused(tmp_path, template_t1_path, reliability_case):
    """--overwrite replaces earlier output files, never a folder of the user's that has an
    output's name: refused before the run, the earlier set left whole."""
    out = tmp_path / "out"
    assert_ok(run_cli("run", template_t1_path, "--out", out, *FAST))
    (out / "report.png").unlink()
    (out / "report.png").mkdir()
    (out / "report.png" / "figure.svg").write_text("<svg/>")
    (out / "notes.txt").write_text("the user's notes\n")
    before = snapshot(tmp_path)
    result = run_cli("run", template_t1_path, "--out", out, *FAST, "--overwrite", "--fpr", "0.05")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    message = lines[0]
    assert message.startswith("normative-anomaly: error: ") and "report.png" in message and "folder" in message
    assert snapshot(tmp_path) == before
    reliability_case("output folder", "--overwrite where an output's name (report.png) is a folder of the user's",
                     f"exit 1: {message}")


@pytest.mark.parametrize("failing_move", [1, 4, 9, 14])
def test_failed_swap_restores_the_previous_set(failing_move, tmp_path, monkeypatch, template_t1_path,
                                               reliability_case):
    """A move into the output folder fails (e.g. the disk is pulled) while the new set replaces the
    old one with --overwrite: the old set is put back as it was, with the user's other files."""
    from NormativeAnomalyLib import outputs
    from NormativeAnomalyLib.errors import OutputError

    result = _intensity_result(template_t1_path)
    out = tmp_path / "out"
    outputs.write_outputs(result, out)
    (out / "notes.txt").write_text("the user's notes\n")
    before = snapshot(tmp_path)
    moves = {"count": 0}
    real_rename, real_replace = os.rename, os.replace

    def flaky(real):
        def move(source, destination, *args, **kwargs):
            if out in (Path(source).parent, Path(destination).parent):
                moves["count"] += 1
                if moves["count"] == failing_move:
                    raise OSError(5, "Input/output error")
            return real(source, destination, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "rename", flaky(real_rename))
    monkeypatch.setattr(os, "replace", flaky(real_replace))
    threshold = result.model.calibration.threshold_for_fpr(0.05)
    result = dataclasses.replace(result, segmentation=segment_anomalies(result.anomaly_map, threshold,
                                                                        result.segmentation.min_lesion_mm3),
                                 threshold_fpr=result.model.calibration.fpr_for_threshold(threshold))
    with pytest.raises(OutputError) as error:
        outputs.write_outputs(result, out, overwrite=True)
    monkeypatch.undo()
    assert moves["count"] >= failing_move
    assert "\n" not in str(error.value)
    assert snapshot(tmp_path) == before
    reliability_case("fault", f"move number {failing_move} of the output swap fails (--overwrite)",
                     f"{error.value}; the previous set and the user's files restored byte for byte")


@pytest.mark.slow
def test_ctrl_c_while_writing_keeps_the_previous_set(tmp_path, template_t1_path, reliability_case):
    """Ctrl-C (SIGINT) once the run is writing its outputs: the new set is not moved in."""
    out = tmp_path / "out"
    assert_ok(run_cli("run", template_t1_path, "--out", out, *FAST))
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(LIBRARY_ROOT))
    run = subprocess.Popen([sys.executable, "-m", "NormativeAnomalyLib.cli", "run", str(template_t1_path),
                            "--out", str(out), "--overwrite", "--fpr", "0.05", "--progress-lines", *FAST],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                           errors="replace", env=env)
    for line in run.stdout:
        if "writing" in line:
            run.send_signal(signal.SIGINT)
            break
    run.stdout.read()
    stderr = run.stderr.read()
    run.wait(timeout=300)
    lines = stderr.strip().splitlines()
    assert run.returncode == 130, stderr
    assert len(lines) == 1 and "cancelled" in lines[0], stderr
    assert snapshot(tmp_path) == before
    reliability_case("fault", "Ctrl-C (SIGINT) while the run writes over a previous result (--overwrite)",
                     f"exit 130: {lines[0]}; the previous set kept byte for byte")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(umask, tmp_path, template_t1_path, reliability_case):
    from NormativeAnomalyLib import outputs

    result = _intensity_result(template_t1_path)
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        outputs.write_outputs(result, out)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in out.iterdir()}
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert modes == {name: 0o666 & ~umask for name in OUTPUT_FILES}
    reliability_case("output folder", f"outputs written under umask {umask:03o}",
                     f"folder {0o777 & ~umask:o}, files {0o666 & ~umask:o}, as every other tool")
