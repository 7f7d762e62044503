"""The ``normative-anomaly`` command line, end to end, as subprocesses.

Each call is ``python -m NormativeAnomalyLib.cli ...`` with ``PYTHONPATH`` pointing at the
core library, so nothing has to be installed. Successful runs use the small fixtures (and
one real-head run shared by the module); every bad input must fail with one line on
stderr, a non-zero exit status, and leave the output folder (and everything around it) as
it was.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

from NormativeAnomalyLib.models import default_model_name, resolve_model
from NormativeAnomalyLib.resources import demo_case

from NormativeAnomalyLib.run_folder import LESION_COLUMNS, MAP_FILES, OUTPUT_FILES, read_run_folder

from cli_runs import LIBRARY_ROOT, REPO, assert_complete_outputs, assert_ok, read_json, run_cli, snapshot

BUNDLED_INTENSITY_PACKAGE = REPO / "Resources" / "Models" / "intensity-t1"


def write_like(values: np.ndarray, like: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def dae_package_dir(trained_dae) -> Path:
    """The folder of the session's really trained DAE package."""
    return Path(trained_dae.path)


# --- successful runs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_run(real_t1_head_path, tmp_path_factory):
    """One default run on the real (oblique/permuted) head, with --json; about a minute on 2 cores."""
    out = tmp_path_factory.mktemp("cli-head") / "out"
    result = run_cli("run", real_t1_head_path, "--out", out, "--json")
    assert_ok(result)
    return result, out


@pytest.mark.slow
def test_run_writes_every_output(head_run, real_t1_head_path):
    _, out = head_run
    summary = assert_complete_outputs(out)
    assert summary["model"]["name"] == default_model_name()
    assert summary["model"]["family"] == resolve_model().family
    assert isinstance(summary["threshold"], float) and np.isfinite(summary["threshold"])
    assert summary["threshold_healthy_fpr"] == pytest.approx(resolve_model().card["scoring"]["default_fpr"])
    assert summary["settings"]["input"] == str(real_t1_head_path)
    assert summary["registration"]["kind"] == "affine"
    for name in ("pseudo_healthy.nii.gz", "anomaly_map.nii.gz"):
        image = sitk.ReadImage(str(out / name))
        assert image.GetPixelID() == sitk.sitkFloat32
        assert np.isfinite(sitk.GetArrayViewFromImage(image)).all()


@pytest.mark.slow
def test_lesion_table_csv_matches_json(head_run):
    _, out = head_run
    lesions = read_json(out / "lesions.json")
    summary = read_json(out / "run.json")
    with open(out / "lesions.csv", newline="") as stream:
        reader = csv.DictReader(stream)
        assert tuple(reader.fieldnames) == LESION_COLUMNS
        rows = list(reader)
    assert len(rows) == len(lesions) == summary["lesion_count"]
    assert summary["lesion_volume_ml"] == pytest.approx(sum(l["volume_ml"] for l in lesions), abs=1e-3)
    for row, lesion in zip(rows, lesions):
        assert int(row["id"]) == lesion["id"]
        assert int(row["voxels"]) == lesion["voxels"]
        for column in ("volume_ml", "max_score", "mean_score"):
            assert float(row[column]) == pytest.approx(lesion[column], rel=1e-9, abs=1e-12)
        centroid = [float(row[c]) for c in ("centroid_r", "centroid_a", "centroid_s")]
        assert centroid == pytest.approx(lesion["centroid_ras"], abs=1e-9)
    assert [l["id"] for l in lesions] == list(range(1, len(lesions) + 1))


@pytest.mark.slow
def test_json_flag_prints_the_run_summary(head_run):
    result, out = head_run
    printed = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert printed == read_json(out / "run.json")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["anomaly_map.nii.gz", "pseudo_healthy.nii.gz", "anomalies.seg.nrrd"])
def test_outputs_overlay_the_input_exactly(head_run, real_t1_head_path, name):
    _, out = head_run
    source = sitk.ReadImage(str(real_t1_head_path))
    direction = np.asarray(source.GetDirection()).reshape(3, 3)
    assert not np.allclose(direction, np.diag(np.diag(direction))), "the fixture should have a non-diagonal direction"
    written = sitk.ReadImage(str(out / name))
    assert written.GetDimension() == 3
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-4)
    assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-4)


@pytest.mark.slow
def test_run_with_a_trained_dae_package(dae_package_dir, template_t1_path, tmp_path):
    out = tmp_path / "out"
    result = run_cli("run", template_t1_path, "--registered", "--model", dae_package_dir, "--out", out, "--quiet")
    assert_ok(result)
    summary = assert_complete_outputs(out)
    assert summary["model"]["name"] == "dae-test"
    assert summary["model"]["family"] == "dae"
    assert Path(summary["model"]["path"]) == dae_package_dir
    assert summary["registration"]["kind"] == "none"  # --registered: no registration
    assert "dae-test" in result.stdout
    # A real network: its pseudo-healthy image differs from the input inside the brain.
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(template_t1_path)))
    healthy = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "pseudo_healthy.nii.gz")))
    assert healthy.shape == source.shape
    assert np.isfinite(healthy).all()
    assert not np.allclose(healthy, source)


@pytest.mark.slow
def test_demo(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", out, "--quiet")
    assert_ok(result)
    summary = assert_complete_outputs(out)
    assert "demo_dice" in summary
    dice = summary["demo_dice"]
    assert dice is None or 0.0 <= dice <= 1.0
    assert Path(summary["input"]).name == demo_case().image.name
    assert summary["model"]["name"] == default_model_name()
    assert summary["demo_dice"] > 0.02  # the default model's segmentation overlaps the lesion (baseline: 0.000)


@pytest.mark.slow
def test_overwrite_replaces_outputs_and_keeps_the_users_files(template_t1_path, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_bytes(b"the user's own notes\n\x00\xff")
    (out / "run.json").write_text("stale")
    result = run_cli("run", template_t1_path, "--registered", "--out", out, "--overwrite", "--quiet")
    assert_ok(result)
    assert (out / "notes.txt").read_bytes() == b"the user's own notes\n\x00\xff"
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, "notes.txt"])
    assert read_json(out / "run.json")["model"]["name"] == default_model_name()
    assert not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.slow
def test_maps_only_writes_what_a_front_end_reads(template_t1_path, tmp_path):
    """A GUI's run (--maps-only, as background.run_command asks) writes run.json and the maps only;
    over an earlier full set (--overwrite) it leaves none of the earlier segmentation or tables."""
    from NormativeAnomalyLib.background import run_command

    assert "--maps-only" in run_command(template_t1_path, tmp_path / "gui")
    out = tmp_path / "out"
    assert_ok(run_cli("run", template_t1_path, "--registered", "--out", out, "--quiet"))
    assert_ok(run_cli("run", template_t1_path, "--registered", "--out", out, "--quiet", "--maps-only", "--overwrite"))
    assert sorted(p.name for p in out.iterdir()) == sorted(MAP_FILES)
    assert read_json(out / "run.json")["outputs"] == list(MAP_FILES)
    outputs = read_run_folder(out)
    assert outputs.anomaly_map.GetSize() == sitk.ReadImage(str(template_t1_path)).GetSize()


def test_models_lists_the_default():
    result = run_cli("models")
    assert_ok(result)
    assert any(line.startswith(f"{default_model_name()} (default)") for line in result.stdout.splitlines()), \
        result.stdout


def test_models_json():
    result = run_cli("models", "--json")
    assert_ok(result)
    rows = json.loads(result.stdout)
    assert isinstance(rows, list) and rows
    defaults = [row["name"] for row in rows if row["default"]]
    assert defaults == [default_model_name()]
    row = next(row for row in rows if row["name"] == "intensity-t1")
    assert row["family"] == "intensity" and row["modality"] == "T1"
    assert Path(row["path"]).is_dir()
    # One model per contrast is the one a front end preselects for a scan of that contrast.
    per_modality = {}
    for row in rows:
        if row.get("default_for_modality"):
            assert row["modality"] not in per_modality, row
            per_modality[row["modality"]] = row["name"]
    assert per_modality == {"T1": "dae-t1", "T2": "dae-t2", "FLAIR": "intensity-flair"}


def test_models_lists_installed_packages_and_a_broken_one_with_its_error(tmp_path):
    """Packages installed with ``models install`` (the user's models folder) are listed after
    the bundled ones; a tampered one is listed as unusable, not a crash."""
    root = tmp_path / "models"
    for name in ("ae3d-mine", "ae3d-broken"):
        shutil.copytree(REPO / "Resources" / "Models" / "ae3d-t1", root / name)
        card = read_json(root / name / "model.json")
        card["name"] = name
        (root / name / "model.json").write_text(json.dumps(card))
    weights = root / "ae3d-broken" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    env = dict(os.environ, PYTHONPATH=str(LIBRARY_ROOT), NORMATIVE_ANOMALY_MODELS=str(root))
    result = subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", "models", "--json"], capture_output=True,
                            text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert_ok(result)
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["ae3d-mine"]["installed"] and rows["ae3d-mine"]["family"] == "ae"
    assert rows["ae3d-broken"]["installed"] and "SHA-256" in rows["ae3d-broken"]["error"]
    assert not rows[default_model_name()]["installed"]
    # What the Slicer panel's model selector lists (read as plain JSON, without torch)
    from NormativeAnomalyLib.models import model_summaries

    summaries = {summary["name"]: summary for summary in model_summaries(user_root=root)}
    assert summaries["ae3d-mine"]["installed"] and summaries["ae3d-mine"]["family"] == "ae"
    assert summaries["ae3d-broken"]["installed"] and not summaries[default_model_name()]["installed"]


# --- bad input ---------------------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command: what a malicious "weights" file would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@dataclasses.dataclass
class Case:
    tmp: Path
    tiny: Path  # a valid small T1, for cases about something other than the input
    template_t1: Path
    request: pytest.FixtureRequest

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def dae_copy(self) -> Path:
        source = Path(self.request.getfixturevalue("trained_dae").path)
        copy = self.tmp / "dae-copy"
        shutil.copytree(source, copy)
        return copy

    def run(self, input_path: Path, *extra) -> list:
        return ["run", input_path, "--out", self.out, *extra]


def _tiny(case: Case) -> sitk.Image:
    return sitk.ReadImage(str(case.tiny), sitk.sitkFloat32)


def missing_file(c: Case):
    return c.run(c.tmp / "no-such-scan.nii.gz")


def image_2d(c: Case):
    path = c.tmp / "slice.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((40, 40), dtype=np.float32)), str(path))
    return c.run(path)


def image_4d(c: Case):
    path = c.tmp / "fmri.nii.gz"
    frames = [sitk.GetImageFromArray(np.random.default_rng(t).random((20, 20, 20), dtype=np.float32)) for t in range(3)]
    series = sitk.JoinSeries(frames)
    assert series.GetDimension() == 4 and series.GetNumberOfComponentsPerPixel() == 1
    sitk.WriteImage(series, str(path))
    return c.run(path)


def image_rgb(c: Case):
    path = c.tmp / "colour.nii.gz"
    values = np.random.default_rng(0).integers(0, 255, (20, 20, 20, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(values, isVector=True), str(path))
    return c.run(path)


def all_zero(c: Case):
    tiny = _tiny(c)
    return c.run(write_like(np.zeros_like(sitk.GetArrayFromImage(tiny)), tiny, c.tmp / "empty.nii.gz"))


def constant(c: Case):
    tiny = _tiny(c)
    return c.run(write_like(np.full_like(sitk.GetArrayFromImage(tiny), 100.0), tiny, c.tmp / "constant.nii.gz"))


def _one_bad_voxel(c: Case, value: float, name: str) -> list:
    tiny = _tiny(c)
    values = sitk.GetArrayFromImage(tiny)
    values[10, 20, 15] = value
    return c.run(write_like(values, tiny, c.tmp / name))


def one_nan(c: Case):
    return _one_bad_voxel(c, np.nan, "nan.nrrd")


def one_inf(c: Case):
    return _one_bad_voxel(c, np.inf, "inf.mha")


def one_nan_nifti(c: Case):
    return _one_bad_voxel(c, np.nan, "nan.nii.gz")


def one_inf_nifti(c: Case):
    return _one_bad_voxel(c, -np.inf, "inf.nii.gz")


def not_an_image(c: Case):
    path = c.tmp / "scan.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(64 * 1024))
    return c.run(path)


def truncated_gzip_nifti(c: Case):
    # The real template image (1.3 MB .nii.gz) cut in half; --registered so that, if the
    # library accepts it, the wrongful run finishes in seconds rather than a minute.
    data = c.template_t1.read_bytes()
    assert data[:2] == b"\x1f\x8b"
    path = c.tmp / "half.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return c.run(path, "--registered")


def unknown_model(c: Case):
    return c.run(c.tiny, "--model", "no-such-model")


def flipped_weight_byte(c: Case):
    package = c.dae_copy()
    weights = package / "weights.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    return c.run(c.tiny, "--model", package)


MARKER = "pickle-was-executed"


def pickled_weights(c: Case):
    package = c.dae_copy()
    weights = package / "weights.safetensors"
    blob = pickle.dumps(Payload(f"touch '{c.tmp / MARKER}'"), protocol=2)
    weights.write_bytes(blob)
    card = read_json(package / "model.json")
    card["weights"]["sha256"] = hashlib.sha256(blob).hexdigest()  # the hash check passes; the parser must refuse
    (package / "model.json").write_text(json.dumps(card, indent=2))
    return c.run(c.tiny, "--model", package)


def card_fails_schema(c: Case):
    package = c.tmp / "bad-card"
    shutil.copytree(BUNDLED_INTENSITY_PACKAGE, package)
    card = read_json(package / "model.json")
    card["family"] = "foo"
    (package / "model.json").write_text(json.dumps(card, indent=2))
    return c.run(c.tiny, "--model", package)


def non_empty_out(c: Case):
    c.out.mkdir()
    (c.out / "notes.txt").write_bytes(b"keep me\n")
    (c.out / "anomaly_map.nii.gz").write_bytes(b"the user's own file with an output's name")
    return c.run(c.tiny)


def negative_min_lesion(c: Case):
    return c.run(c.tiny, "--min-lesion-mm3=-5")


def cuda_without_gpu(c: Case):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    return c.run(c.tiny, "--device", "cuda")


# (builder, a word the one-line message must contain, lower case)
BAD_INPUTS: list = [
    pytest.param(missing_file, "not found", id="missing-file"),
    pytest.param(image_2d, "2d", id="2d-image"),
    pytest.param(image_4d, "4d", id="4d-image"),
    pytest.param(image_rgb, "components", id="rgb-3d-image"),
    pytest.param(all_zero, "empty", id="all-zero"),
    pytest.param(constant, "constant", id="constant"),
    pytest.param(one_nan, "nan", id="one-nan"),
    pytest.param(one_inf, "infinite", id="inf"),
    pytest.param(one_nan_nifti, "nan", id="one-nan-nifti"),
    pytest.param(one_inf_nifti, "infinite", id="inf-nifti"),
    pytest.param(not_an_image, "cannot be read", id="not-an-image"),
    pytest.param(truncated_gzip_nifti, "truncated", id="truncated-nifti"),
    pytest.param(unknown_model, "unknown model", id="unknown-model"),
    pytest.param(flipped_weight_byte, "sha-256", id="weights-flipped-byte"),
    pytest.param(pickled_weights, "safetensors", id="weights-are-a-pickle"),
    pytest.param(card_fails_schema, "family", id="card-fails-schema"),
    pytest.param(non_empty_out, "not empty", id="out-not-empty"),
    pytest.param(negative_min_lesion, "min-lesion-mm3", id="negative-min-lesion"),
    pytest.param(cuda_without_gpu, "cuda", id="cuda-without-gpu"),
]


DESCRIPTIONS = {
    "missing-file": "input file does not exist", "2d-image": "2D image", "4d-image": "4D image (3 frames)",
    "rgb-3d-image": "3D colour (3-component) image", "all-zero": "all-zero volume", "constant": "constant volume",
    "one-nan": "one NaN voxel (NRRD)", "inf": "one +Inf voxel (MHA)", "one-nan-nifti": "one NaN voxel (NIfTI)",
    "inf-nifti": "one -Inf voxel (NIfTI)", "not-an-image": "random bytes named .nii.gz",
    "truncated-nifti": "gzipped NIfTI cut in half", "unknown-model": "unknown model name",
    "weights-flipped-byte": "one byte of the weights flipped",
    "weights-are-a-pickle": "weights replaced by a pickle whose unpickling runs a shell command (card hash updated)",
    "card-fails-schema": "card with an unknown family", "out-not-empty": "--out holds the user's files",
    "negative-min-lesion": "negative --min-lesion-mm3", "cuda-without-gpu": "--device cuda on a machine without CUDA",
}
AREAS = {"unknown-model": "model package", "weights-flipped-byte": "model package",
         "weights-are-a-pickle": "model package", "card-fails-schema": "model package",
         "out-not-empty": "output folder", "negative-min-lesion": "options", "cuda-without-gpu": "options"}


@pytest.mark.reliability
@pytest.mark.parametrize("build, keyword", BAD_INPUTS)
def test_bad_input_fails_cleanly(build: Callable[[Case], list], keyword: str, tmp_path, tiny_t1_path,
                                 template_t1_path, request, reliability_case):
    case = Case(tmp_path, tiny_t1_path, template_t1_path, request)
    args = build(case)
    before = snapshot(tmp_path)
    result = run_cli(*args)
    after = snapshot(tmp_path)

    assert result.returncode != 0, f"exit 0 for bad input\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr should be one line:\n{result.stderr}"
    message = lines[0].strip()
    assert message.startswith("normative-anomaly:") and len(message) > len("normative-anomaly:") + 5
    assert "internal error" not in message, message
    assert keyword in message.lower(), message
    assert after == before, "the run changed files: " + ", ".join(
        sorted(set(before) ^ set(after) | {k for k in before if k in after and before[k] != after[k]}))
    assert not (tmp_path / MARKER).exists(), "unpickling the weights ran code"
    case_id = request.node.callspec.id
    area = AREAS.get(case_id, "input volume")
    reliability_case(area, DESCRIPTIONS[case_id], f"exit {result.returncode}: {message}")


def test_pickle_payload_is_live(tmp_path):
    """The pickled_weights case is meaningful only if unpickling its payload really runs code."""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(f"touch '{marker}'"), protocol=2))
    assert marker.exists()
