"""Option values and output destinations a user may type: refused before any work with one line
on stderr and exit 1 (nothing changed), or handled correctly. Never an internal error.

Every case is recorded for docs/reliability.md (scripts/reliability_report.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_runs import assert_complete_outputs, assert_ok, read_json, run_cli, snapshot

from NormativeAnomalyLib.models import resolve_model

pytestmark = pytest.mark.reliability

FAST = ("--model", "intensity-t1", "--registered", "--quiet")  # the template itself: no registration needed


def assert_refused(result: subprocess.CompletedProcess, keyword: str) -> str:
    """Exit 1 with one line on stderr that names the problem; the line is returned."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert len(lines) == 1, f"stderr should be one line:\n{result.stderr}"
    message = lines[0]
    assert message.startswith("normative-anomaly: error: ") and "internal error" not in message, message
    assert keyword in message, message
    return message


def strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity are not JSON."""
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


# --- options -----------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [("--threshold", "nan"), ("--threshold", "inf"), ("--threshold", "-inf"),
                                           ("--min-lesion-mm3", "nan"), ("--min-lesion-mm3", "inf"),
                                           ("--fpr", "nan"), ("--fpr", "inf")])
def test_non_finite_number_is_refused(option, value, tmp_path, template_t1_path, reliability_case):
    before = snapshot(tmp_path)
    result = run_cli("run", template_t1_path, "--out", tmp_path / "out", *FAST, f"{option}={value}")
    message = assert_refused(result, option)
    assert "finite" in message
    assert snapshot(tmp_path) == before
    reliability_case("options", f"{option} {value}", f"exit 1: {message}")


@pytest.mark.parametrize("args, keyword", [
    (("batch", "{tmp}/cases", "--out", "{tmp}/out", "--batch-size", "1e9"), "--batch-size"),
    (("run", "{tmp}/scan.nii.gz"), "--out"),
    (("run", "{tmp}/scan.nii.gz", "--out", "{tmp}/out", "--no-such-option"), "--no-such-option"),
    (("run", "{tmp}/scan.nii.gz", "--out", "{tmp}/out", "--device", "tpu"), "--device"),
    (("run", "{tmp}/scan.nii.gz", "--out", "{tmp}/out", "--threshold", "0.5", "--fpr", "0.01"), "--fpr"),
    (("no-such-command",), "no-such-command"),
], ids=["batch-size-1e9", "no-out", "unknown-option", "unknown-device", "threshold-and-fpr", "unknown-command"])
def test_parse_error_is_one_line(args, keyword, tmp_path, reliability_case):
    before = snapshot(tmp_path)
    result = run_cli(*(arg.format(tmp=tmp_path) for arg in args), timeout=120)
    message = assert_refused(result, keyword)
    assert "usage:" not in result.stderr
    assert snapshot(tmp_path) == before
    shown = " ".join(arg.replace("{tmp}/", "") for arg in args)
    reliability_case("options", f"command line that does not parse: {shown}", f"exit 1: {message}")


def test_negative_threshold_is_refused(tmp_path, template_t1_path, reliability_case):
    before = snapshot(tmp_path)
    message = assert_refused(run_cli("run", template_t1_path, "--out", tmp_path / "out", *FAST, "--threshold=-1"),
                             "--threshold")
    assert snapshot(tmp_path) == before
    reliability_case("options", "--threshold -1 (the anomaly map is never negative)", f"exit 1: {message}")


@pytest.mark.parametrize("option, value, end", [("--fpr", "1e-9", 0), ("--threshold", "1000", 0),
                                                ("--fpr", "0.9", -1), ("--threshold", "0.001", -1)],
                         ids=["fpr-below", "threshold-above", "fpr-above", "threshold-below"])
@pytest.mark.slow
def test_threshold_outside_the_calibration_is_clamped_and_reported(option, value, end, tmp_path, template_t1_path,
                                                                   reliability_case):
    """The calibration covers healthy false-positive rates 1e-5 to 0.5: a rate or threshold beyond
    is moved to the nearest end, with a one-line note, and run.json reports what was used."""
    calibration = resolve_model("intensity-t1").calibration
    out = tmp_path / "out"
    result = run_cli("run", template_t1_path, "--out", out, *FAST, option, value)
    assert_ok(result)
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("normative-anomaly: note: "), result.stderr
    assert "outside the model's calibrated range" in notes[0]
    summary = read_json(out / "run.json")
    assert summary["threshold_healthy_fpr"] == pytest.approx(calibration.fpr[end])
    assert summary["threshold"] == pytest.approx(calibration.threshold[end])
    assert summary["settings"][option.lstrip("-")] == float(value)  # what was asked stays on record
    reliability_case("options", f"{option} {value}: outside the model's calibration",
                     f"exit 0, notice: {notes[0]}; run.json reports the rate used ({calibration.fpr[end]:g})")


def test_run_json_is_standard_json_even_with_non_finite_values(tmp_path, template_t1_path, reliability_case):
    """A front end's settings or figures that are NaN or infinite are written as null."""
    from NormativeAnomalyLib.outputs import write_outputs
    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
    from NormativeAnomalyLib.volume_io import read_volume

    result = detect_anomalies(read_volume(template_t1_path), resolve_model("intensity-t1"), RunOptions(registered=True))
    out = tmp_path / "out"
    write_outputs(result, out, {"threshold": float("nan"), "fpr": float("inf")},
                  extra_summary={"score": [1.0, float("-inf")]})
    summary = strict_json((out / "run.json").read_text())
    assert summary["settings"]["threshold"] is None and summary["settings"]["fpr"] is None
    assert summary["score"] == [1.0, None]
    strict_json((out / "lesions.json").read_text())
    reliability_case("output folder", "NaN and infinite values in a run's settings (library callers)",
                     "run.json written as standard JSON: the values are null")


@pytest.mark.parametrize("args, keyword", [(("--max-upload-mb", "nan"), "--max-upload-mb"),
                                           (("--max-upload-mb", "inf"), "--max-upload-mb"),
                                           (("--max-upload-mb", "0"), "--max-upload-mb"),
                                           (("--port", "99999"), "--port"), (("--port", "-1"), "--port")],
                         ids=["upload-nan", "upload-inf", "upload-zero", "port-99999", "port-negative"])
def test_serve_option_is_refused_before_starting(args, keyword, tmp_path, reliability_case):
    work = tmp_path / "work"
    result = run_cli("serve", "--work-dir", work, *args, timeout=120)
    message = assert_refused(result, keyword)
    assert not work.exists()
    reliability_case("web app", f"serve {' '.join(args)}", f"exit 1: {message}")


# --- output destinations -----------------------------------------------------------------


def _immutable(folder: Path) -> None:
    """A folder nobody may write into, root included (tests run as root): chattr +i."""
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")


def _mutable(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], check=False)


@pytest.mark.parametrize("where, keyword", [("/proc/normative-anomaly-test/out", "cannot"),
                                            ("/sys/normative-anomaly-test-out", "cannot"),
                                            ("{tmp}/notes.txt/out", "cannot"),
                                            ("{tmp}/read-only/out", "cannot"),
                                            ("{tmp}/read-only-out", "cannot"),
                                            ("{tmp}/dangling", "symbolic link"),
                                            ("{tmp}/" + "n" * 300, "too long")],
                         ids=["under-proc", "under-sys", "parent-is-a-file", "read-only-parent",
                              "read-only-out-overwrite", "dangling-symlink", "name-of-300-bytes"])
def test_unusable_destination_is_refused_before_the_run(where, keyword, tmp_path, template_t1_path,
                                                        reliability_case):
    (tmp_path / "notes.txt").write_text("the user's notes\n")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "read-only").mkdir()
    (tmp_path / "read-only-out").mkdir()
    (tmp_path / "read-only-out" / "run.json").write_text("an earlier run\n")
    before = snapshot(tmp_path)
    out = where.format(tmp=tmp_path)
    frozen = [tmp_path / ("read-only" if "read-only/" in out else "read-only-out")] if "read-only" in out else []
    for folder in frozen:
        _immutable(folder)
    try:
        result = run_cli("run", template_t1_path, "--out", out, *FAST, "--overwrite")
    finally:
        for folder in frozen:
            _mutable(folder)
    message = assert_refused(result, keyword)
    assert snapshot(tmp_path) == before
    assert (tmp_path / "dangling").is_symlink()
    case = where.replace("{tmp}/", "").replace("n" * 300, "a folder name of 300 bytes")
    reliability_case("output folder", f"--out {case}", f"exit 1: {message}")


@pytest.mark.slow
def test_symlink_to_an_empty_folder_is_written_through(tmp_path, template_t1_path, reliability_case):
    target = tmp_path / "results"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert_ok(run_cli("run", template_t1_path, "--out", link, *FAST))
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert_complete_outputs(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "results"]  # no lock, no staging left
    reliability_case("output folder", "--out is a symbolic link to an empty folder",
                     "exit 0: the outputs are written into the linked folder; the link is kept")


@pytest.mark.parametrize("name, case", [
    (b"out\xff", "a folder name with a byte that is not UTF-8 (b'out\\xff')"),
    (b"dir\xfe/out", "a parent folder whose name is not UTF-8 (b'dir\\xfe/out')"),
    (b"n" * 240, "a folder name of 240 bytes"), (b"n" * 255, "a folder name of 255 bytes (the most there is)"),
], ids=["non-utf8-name", "non-utf8-parent", "name-of-240-bytes", "name-of-255-bytes"])
@pytest.mark.slow
def test_odd_but_valid_destination_is_written(name, case, tmp_path, template_t1_path, reliability_case):
    """Names ITK cannot take (not UTF-8) and names so long that the lock or staging folder
    beside them would pass the 255-byte limit."""
    out = tmp_path / os.fsdecode(name)
    result = run_cli("run", template_t1_path, "--out", out, *FAST)
    assert_ok(result)
    assert_complete_outputs(out)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no lock, no staging folder left
    reliability_case("output folder", f"--out: {case}", "exit 0: the complete set is written; no lock or staging "
                     "folder left")
