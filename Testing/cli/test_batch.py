"""``normative-anomaly batch``: a cohort in one process and under torchrun, resumed, with a bad case.

Real runs on small real volumes: noised copies of the 2 mm template given as ``--registered``
inputs to the bundled ``intensity-t1`` model, so a case takes about a second and the
torchrun launch (two CPU workers, gloo) dominates the runtime.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from NormativeAnomalyLib.batch import Case, Worker, read_cases, shard
from NormativeAnomalyLib.cli import main
from NormativeAnomalyLib.errors import NormativeAnomalyError
from NormativeAnomalyLib.run_folder import OUTPUT_FILES

REPO = Path(__file__).resolve().parents[2]
FAST = ["--model", "intensity-t1", "--registered"]


def noised_copy(source: Path, path: Path, seed: int) -> Path:
    image = sitk.ReadImage(str(source), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(image)
    rng = np.random.default_rng(seed)
    values += rng.normal(0.0, 0.03 * float(values.max()), values.shape).astype(np.float32)
    noisy = sitk.GetImageFromArray(values)
    noisy.CopyInformation(image)
    sitk.WriteImage(noisy, str(path))
    return path


@pytest.fixture(scope="module")
def cohort(template_t1_path, tmp_path_factory) -> Path:
    """A folder of three real volumes (the template, noised three ways)."""
    folder = tmp_path_factory.mktemp("cohort")
    for seed, name in enumerate(("case-a", "case-b", "case-c")):
        noised_copy(template_t1_path, folder / f"{name}.nii.gz", seed)
    return folder


def summary(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as stream:
        return list(csv.DictReader(stream))


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for log in sorted((out / ".batch").glob("rank-*.jsonl"))
            for line in log.read_text().splitlines()]


def file_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def assert_complete_case(out: Path, case_id: str, input_path: Path) -> dict:
    folder = out / case_id
    assert sorted(p.name for p in folder.iterdir()) == sorted(OUTPUT_FILES)
    run = json.loads((folder / "run.json").read_text())
    assert run["input"] == str(input_path) and run["batch_case_id"] == case_id
    return run


@pytest.fixture(scope="module")
def finished_batch(cohort, tmp_path_factory):
    """(out folder, summary rows, stdout) of one single-process batch over the cohort."""
    out = tmp_path_factory.mktemp("batch") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # capsys is per test
        status = main(["batch", str(cohort), "--out", str(out), *FAST])
    assert status == 0, stdout.getvalue()
    return out, summary(out), stdout.getvalue()


def test_case_list_ids_are_stable_unique_and_checked(tmp_path):
    """Ids from file stems, made unique in list order; given ids kept; relative paths from the
    list's folder; sharding covers every case once."""
    (tmp_path / "a").mkdir()
    listing = tmp_path / "cases.txt"
    listing.write_text("# cohort\na/t1.nii.gz\n\nb/t1.nii.gz\n/data/sub 01.nrrd\nc/T1.nii.gz\n")
    cases = read_cases(listing)
    assert [c.case_id for c in cases] == ["t1", "t1-2", "sub_01", "T1-3"]  # unique on case-blind disks too
    assert cases[0].input == tmp_path / "a" / "t1.nii.gz"
    assert read_cases(listing) == cases  # the same list, the same ids

    table = tmp_path / "cases.csv"
    table.write_text("case_id,path\nP7,x.nii.gz\n,t1.nii.gz\nt1,y.nii.gz\n")
    assert [(c.case_id, c.input.name) for c in read_cases(table)] == [("P7", "x.nii.gz"), ("t1-2", "t1.nii.gz"),
                                                                     ("t1", "y.nii.gz")]
    table.write_text("case_id,path\nP7,x.nii.gz\nP7,y.nii.gz\n")
    with pytest.raises(NormativeAnomalyError, match="appears twice"):
        read_cases(table)
    table.write_text("case_id,path\n../up,x.nii.gz\n")
    with pytest.raises(NormativeAnomalyError, match="case id '../up'"):
        read_cases(table)
    with pytest.raises(NormativeAnomalyError, match="is a volume"):
        read_cases(REPO / "Testing" / "Data" / "nibabel_anatomical.nii.gz")

    many = [Case(f"c{i}", Path(f"c{i}.nii.gz")) for i in range(7)]
    shards = [shard(many, Worker(rank=r, world_size=3)) for r in range(3)]
    assert [c.case_id for c in shards[1]] == ["c1", "c4"]
    assert sorted(c.case_id for s in shards for c in s) == sorted(c.case_id for c in many)


def test_single_process_batch_writes_every_case_and_a_summary(finished_batch, cohort):
    out, rows, stdout = finished_batch
    assert [row["case_id"] for row in rows] == ["case-a", "case-b", "case-c"]
    for row in rows:
        run = assert_complete_case(out, row["case_id"], cohort / f"{row['case_id']}.nii.gz")
        assert row["status"] == "ok" and row["error"] == ""
        assert int(row["lesion_count"]) == run["lesion_count"]
        assert float(row["lesion_volume_ml"]) == run["lesion_volume_ml"]
        assert float(row["threshold"]) == run["threshold"] and float(row["seconds"]) > 0
    assert not list(out.glob(".*.partial-*"))
    lines = stdout.splitlines()
    assert [line.split()[1] for line in lines[:3]] == ["case-a:", "case-b:", "case-c:"]
    assert lines[-1] == f"summary in {out / 'summary.csv'}"


def test_rerun_skips_finished_cases_and_redoes_the_rest(finished_batch, cohort, tmp_path, capsys):
    """A rerun after a killed run: the finished cases are skipped (their files untouched), the
    case that never finished runs, and the dead run's staging folder is cleared."""
    out, first_rows, _ = finished_batch
    shutil.rmtree(out / "case-c")  # as if the first run was killed while writing case-c
    stale = out / ".case-c.partial-dead"
    stale.mkdir()
    (stale / "anomaly_map.nii.gz").write_bytes(b"half")
    before = {case: file_times(out / case) for case in ("case-a", "case-b")}

    assert main(["batch", str(cohort), "--out", str(out), *FAST]) == 0
    rows = summary(out)
    assert [row["status"] for row in rows] == ["skipped-finished", "skipped-finished", "ok"]
    for row, first in zip(rows[:2], first_rows[:2]):  # the figures come from the finished run.json
        assert (row["lesion_count"], row["lesion_volume_ml"], row["threshold"]) == \
               (first["lesion_count"], first["lesion_volume_ml"], first["threshold"])
    assert {case: file_times(out / case) for case in ("case-a", "case-b")} == before
    assert_complete_case(out, "case-c", cohort / "case-c.nii.gz")
    assert not stale.exists()
    assert "case-a: skipped-finished" in capsys.readouterr().out


def test_rerun_with_other_settings_does_not_mix_results(finished_batch, cohort, capsys):
    out, _, _ = finished_batch
    before = file_times(out / "case-a")
    assert main(["batch", str(cohort), "--out", str(out), *FAST, "--threshold", "0.5"]) == 0
    rows = summary(out)
    assert {row["status"] for row in rows} == {"failed"}
    assert "finished with other settings (threshold None -> 0.5); use another --out" in rows[0]["error"]
    assert file_times(out / "case-a") == before
    capsys.readouterr()


@pytest.mark.slow
def test_torchrun_two_workers_share_the_cases(cohort, tmp_path):
    """torchrun --nproc_per_node 2: each case written exactly once, by its worker (r, r+2, ...),
    and worker 0's summary merges both workers' logs."""
    listing = tmp_path / "cohort.csv"
    names = ["case-a", "case-b", "case-c", "case-a"]
    listing.write_text("case_id,path\n" + "".join(f"S{i},{cohort / name}.nii.gz\n" for i, name in enumerate(names)))
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "NormativeAnomaly"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "NormativeAnomalyLib.cli", "batch", str(listing), "--out", str(out), *FAST],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    records = log_records(out)
    assert sorted(r["case_id"] for r in records) == ["S0", "S1", "S2", "S3"]  # each exactly once
    assert {r["case_id"]: r["rank"] for r in records} == {"S0": 0, "S1": 1, "S2": 0, "S3": 1}
    assert len({r["run"] for r in records}) == 1
    rows = summary(out)
    assert [(row["case_id"], row["status"]) for row in rows] == [(f"S{i}", "ok") for i in range(4)]
    for i, name in enumerate(names):
        assert_complete_case(out, f"S{i}", cohort / f"{name}.nii.gz")
    assert "rank 0]" in done.stdout and "rank 1]" in done.stdout
    assert f"summary in {out / 'summary.csv'}" in done.stdout


@pytest.mark.reliability
def test_a_corrupt_case_fails_alone(cohort, tmp_path, reliability_case, capsys):
    """A truncated volume among good ones: its row says why, the others are written, and the
    batch goes on to the end."""
    corrupt = tmp_path / "truncated.nii.gz"
    corrupt.write_bytes((cohort / "case-b.nii.gz").read_bytes()[:20000])
    corrupt_bytes = corrupt.read_bytes()
    listing = tmp_path / "cases.txt"
    listing.write_text(f"{cohort / 'case-a.nii.gz'}\n{corrupt}\n{cohort / 'case-c.nii.gz'}\n")
    out = tmp_path / "out"

    assert main(["batch", str(listing), "--out", str(out), *FAST]) == 0
    rows = {row["case_id"]: row for row in summary(out)}
    assert [rows[c]["status"] for c in ("case-a", "truncated", "case-c")] == ["ok", "failed", "ok"]
    error = rows["truncated"]["error"]
    assert error.startswith(f"input {corrupt} is corrupt or truncated") and "\n" not in error
    assert_complete_case(out, "case-a", cohort / "case-a.nii.gz")
    assert_complete_case(out, "case-c", cohort / "case-c.nii.gz")
    assert not (out / "truncated").exists() and not list(out.glob(".*.partial-*"))
    assert corrupt.read_bytes() == corrupt_bytes
    printed = capsys.readouterr().out
    assert f"truncated: failed: {error}" in printed and "3 ok" not in printed
    reliability_case("batch", "one corrupt case among good ones", error, lost_nothing=True)


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.reliability
def test_second_batch_into_the_same_out_is_refused(cohort, tmp_path, reliability_case, capsys):
    """Another batch (or run) is writing to --out: refused at once, nothing computed or written."""
    from test_faults import _hold_lock

    out = tmp_path / "out"
    holder = _hold_lock(out)
    try:
        before = sorted(tmp_path.rglob("*"))
        assert main(["batch", str(cohort), "--out", str(out), *FAST]) == 1
        message = _one_line_error(capsys)
        assert message.startswith("normative-anomaly: error: another run") and f"process {holder.pid}" in message
        assert sorted(tmp_path.rglob("*")) == before
    finally:
        holder.kill()
        holder.wait()
    reliability_case("batch", "a second batch into the --out another batch is writing to", f"exit 1: {message}")


@pytest.mark.reliability
def test_too_long_case_id_is_refused(tmp_path, cohort, reliability_case, capsys):
    listing = tmp_path / "cases.csv"
    listing.write_text(f"case_id,path\nP1,{cohort / 'case-a.nii.gz'}\n{'P' * 300},{cohort / 'case-b.nii.gz'}\n")
    out = tmp_path / "out"
    assert main(["batch", str(listing), "--out", str(out), *FAST]) == 1
    message = _one_line_error(capsys)
    assert message.startswith("normative-anomaly: error: case id 'PPP") and "255" in message
    assert not out.exists()
    reliability_case("batch", "a case id of 300 characters in the case list", f"exit 1: {message}")


@pytest.mark.reliability
def test_a_case_that_cannot_be_written_fails_alone(cohort, tmp_path, reliability_case, capsys):
    """A case's folder nobody may write into (chattr +i, which binds root too): that case fails
    with a one-line reason, the others are written."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr")
    out = tmp_path / "out"
    (out / "case-b").mkdir(parents=True)
    if subprocess.run(["chattr", "+i", str(out / "case-b")]).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        assert main(["batch", str(cohort), "--out", str(out), *FAST]) == 0
    finally:
        subprocess.run(["chattr", "-i", str(out / "case-b")])
    rows = {row["case_id"]: row for row in summary(out)}
    assert [rows[c]["status"] for c in ("case-a", "case-b", "case-c")] == ["ok", "failed", "ok"]
    error = rows["case-b"]["error"]
    assert "internal error" not in error and "case-b" in error and "\n" not in error
    assert not any((out / "case-b").iterdir())
    capsys.readouterr()
    reliability_case("batch", "one case's output folder cannot be written (read-only)", error)


@pytest.mark.reliability
def test_batch_into_a_non_utf8_folder(cohort, tmp_path, reliability_case, capsys):
    """ITK cannot take a path that is not UTF-8; the outputs are still written."""
    out = tmp_path / os.fsdecode(b"out\xff")
    assert main(["batch", str(cohort), "--out", str(out), *FAST]) == 0
    assert [row["status"] for row in summary(out)] == ["ok"] * 3
    for name in ("case-a", "case-b", "case-c"):
        assert_complete_case(out, name, cohort / f"{name}.nii.gz")
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no lock left
    capsys.readouterr()
    reliability_case("batch", "--out whose name is not UTF-8 (b'out\\xff')", "every case written; no lock left")


@pytest.mark.reliability
@pytest.mark.slow
def test_a_non_utf8_input_name_does_not_stop_the_cohort(cohort, tmp_path, reliability_case):
    """An input file whose name is not UTF-8 among good ones: the batch goes on to the end
    (in a subprocess: a native abort would take pytest with it)."""
    folder = tmp_path / "cohort"
    shutil.copytree(cohort, folder)
    odd = folder / os.fsdecode(b"case-\xff.nii.gz")
    shutil.copy(cohort / "case-b.nii.gz", odd)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO / "NormativeAnomaly"))
    done = subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", "batch", str(folder), "--out", str(out),
                           *FAST], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row["case_id"]: row for row in summary(out)}
    assert [rows[c]["status"] for c in ("case-a", "case-b", "case-c")] == ["ok"] * 3
    odd_row = rows["case-_"]
    assert odd_row["status"] in ("ok", "failed") and "internal error" not in odd_row["error"]
    outcome = odd_row["status"] if odd_row["status"] == "ok" else f"failed: {odd_row['error']}"
    reliability_case("batch", "an input whose file name is not UTF-8 among good ones",
                     f"that case {outcome}; the others ok")


def test_batch_outputs_follow_the_umask(cohort, tmp_path, capsys):
    out = tmp_path / "out"
    previous = os.umask(0o027)
    try:
        assert main(["batch", str(cohort), "--out", str(out), *FAST, "--quiet"]) == 0
    finally:
        os.umask(previous)
    assert (out / "summary.csv").stat().st_mode & 0o777 == 0o640
    assert {p.stat().st_mode & 0o777 for p in (out / ".batch").iterdir()} == {0o640}
    assert {(out / c).stat().st_mode & 0o777 for c in ("case-a", "case-b", "case-c")} == {0o750}
    capsys.readouterr()


@pytest.mark.reliability
def test_a_case_with_a_long_file_name_is_written(cohort, tmp_path, reliability_case, capsys):
    """A 240-character file name: its case folder fits the 255-byte limit, the hidden staging and
    lock names beside it would not, and are shortened."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    long_name = "x" * 240
    shutil.copy(cohort / "case-a.nii.gz", folder / f"{long_name}.nii.gz")
    out = tmp_path / "out"
    assert main(["batch", str(folder), "--out", str(out), *FAST]) == 0
    assert [(row["case_id"], row["status"]) for row in summary(out)] == [(long_name, "ok")]
    assert_complete_case(out, long_name, folder / f"{long_name}.nii.gz")
    assert sorted(p.name for p in out.iterdir()) == sorted([".batch", long_name, "summary.csv"])
    capsys.readouterr()
    reliability_case("batch", "an input file name of 240 characters (its case folder's staging name would pass "
                     "255 bytes)", "the case is written; no lock or staging folder left")


@pytest.mark.reliability
def test_a_native_library_error_fails_the_case_alone(cohort, tmp_path, monkeypatch, reliability_case, capsys):
    """A reader in C++ raising its own exception type (not one of ours) on one case."""
    from NormativeAnomalyLib import volume_io

    real_read = volume_io.read_volume

    def read(path, *args, **kwargs):
        if Path(path).name == "case-b.nii.gz":
            raise RuntimeError("Exception thrown in SimpleITK ImageFileReader_Execute: itk::ERROR: bad\nsecond line")
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(volume_io, "read_volume", read)
    out = tmp_path / "out"
    assert main(["batch", str(cohort), "--out", str(out), *FAST]) == 0
    rows = {row["case_id"]: row for row in summary(out)}
    assert [rows[c]["status"] for c in ("case-a", "case-b", "case-c")] == ["ok", "failed", "ok"]
    error = rows["case-b"]["error"]
    assert error.startswith("internal error (RuntimeError: ") and "\n" not in error
    capsys.readouterr()
    reliability_case("batch", "a native library raises its own exception on one case", error)
