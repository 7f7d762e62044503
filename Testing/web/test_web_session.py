"""The web app's server side without a browser: what it may read and write, and that it runs
the Slicer module's MRML logic (same segmentation voxels from the same input as the module's path).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trame_slicer", reason="the web requirements are not installed")

from NormativeAnomalyLib.errors import InputVolumeError  # noqa: E402
from NormativeAnomalyLib.models import default_model_name  # noqa: E402
from NormativeAnomalyLib.mrml import run_controller  # noqa: E402
from NormativeAnomalyLib.mrml.lesion_table import read_lesion_table  # noqa: E402
from NormativeAnomalyLib.mrml.scene import create_scene  # noqa: E402
from NormativeAnomalyLib.mrml.volumes import load_volume_file  # noqa: E402
from NormativeAnomalyLib.options import RunOptions  # noqa: E402
from NormativeAnomalyLib.resources import demo_case  # noqa: E402
from NormativeAnomalyWeb.files import FileAccess, safe_name  # noqa: E402
from NormativeAnomalyWeb.session import AnalysisSession, SessionError  # noqa: E402

from test_mrml_logic import segment_on_input_grid  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO / "Resources" / "SampleData"
DEMO = demo_case()


@pytest.fixture
def files(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    access = FileAccess([SAMPLE_DATA, shared], tmp_path / "work", max_upload_bytes=1_000_000)
    yield access, shared
    access.close()


# --- what the browser can reach -------------------------------------------------------------


@pytest.mark.reliability
def test_only_shared_volumes_are_listed_and_readable(files, tmp_path, real_t1_head_path, reliability_case):
    access, shared = files
    (shared / "case.nii.gz").write_bytes(real_t1_head_path.read_bytes())
    (shared / "notes.txt").write_text("not a volume")
    outside = tmp_path / "private.nii.gz"
    outside.write_bytes(real_t1_head_path.read_bytes())
    (shared / "link.nii.gz").symlink_to(outside)  # a link leading out of the shared folder

    labels = [choice.label for choice in access.volumes()]
    assert "shared/case.nii.gz" in labels and f"SampleData/{DEMO.image.name}" in labels
    assert not any("link" in label or "notes" in label for label in labels)
    assert access.resolve(shared / "case.nii.gz") == (shared / "case.nii.gz").resolve()
    for case, path, message in (("a file outside the shared folders", outside, "not in a folder this server shares"),
                                ("a link in a shared folder leading out", shared / "link.nii.gz",
                                 "not in a folder this server shares"),
                                ("a ../ path", shared / ".." / "private.nii.gz", "not in a folder this server shares"),
                                ("/etc/passwd", "/etc/passwd", "not in a folder this server shares"),
                                ("a text file in a shared folder", shared / "notes.txt", "not a volume file"),
                                ("a missing file", shared / "missing.nii.gz", "no such file")):
        with pytest.raises(InputVolumeError, match=message) as error:
            access.resolve(path)
        assert "\n" not in str(error.value)
        reliability_case("web app", f"open {case}", f"refused before reading: {error.value}")


@pytest.mark.reliability
def test_uploads_are_bounded_renamed_and_never_overwrite(files, real_t1_head_path, reliability_case):
    access, _ = files
    with pytest.raises(InputVolumeError, match="over the upload limit") as too_big:
        access.save_upload("big.nii.gz", b"\0" * 1_000_001)
    with pytest.raises(InputVolumeError, match="single-file volume") as header_only:
        access.save_upload("header.nhdr", b"NRRD0004\n")
    assert not any(access.uploads.rglob("*.*"))
    content = real_t1_head_path.read_bytes()
    first = access.save_upload("../../evil/head.nii.gz", content)
    second = access.save_upload("head.nii.gz", content)
    assert first != second and first.read_bytes() == second.read_bytes() == content
    for path in (first, second):
        assert path.is_relative_to(access.uploads) and path.name == "head.nii.gz"
    assert access.resolve(first) == first  # uploads can be opened
    assert safe_name("C:\\Users\\x\\scan 1.nii.gz") == "scan_1.nii.gz" and safe_name("..") == "upload"
    reliability_case("web app", "an upload over the size limit (server side)", f"nothing written: {too_big.value}")
    reliability_case("web app", "an upload of a header-only format (.nhdr)", f"nothing written: {header_only.value}")
    reliability_case("web app", "an upload named ../../evil/head.nii.gz, then another head.nii.gz",
                     "each saved as head.nii.gz in its own new folder under the uploads; nothing overwritten")


# --- the same MRML logic as the Slicer module ------------------------------------------------


def _wait(session: AnalysisSession, timeout_s: float = 600.0):
    import time

    deadline = time.monotonic() + timeout_s
    while session.poll().running:
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.2)


@pytest.mark.slow
def test_web_and_slicer_module_give_the_same_segmentation(files, demo_paths):
    from trame_slicer.core import SlicerApp

    access, _ = files
    model = default_model_name()
    # The Slicer module's path: NormativeAnomalyLogic.startRun / finishRun call these functions.
    standalone = create_scene()
    volume = load_volume_file(standalone.scene, demo_paths[0], "demo_t1")
    handle = run_controller.start_run(volume, model, RunOptions(), None, str(access.work_dir / "slicer"))
    assert run_controller.wait_for_run(handle, 600).returncode == 0
    slicer_nodes, slicer_live = run_controller.finish_run(handle, standalone.scene, standalone.color_logic)
    # The web app's path, on trame-slicer's scene.
    app = SlicerApp()
    session = AnalysisSession(app.scene, access)
    session.load(DEMO.image)
    session.start(model)
    _wait(session)
    web = session.finish()

    calibration = slicer_nodes.calibration
    for fpr, min_mm3 in ((0.01, None), (0.05, 100.0), (0.002, 0.0)):
        threshold = calibration.threshold_for_fpr(fpr)
        slicer_live.update(threshold=threshold, min_lesion_mm3=min_mm3)
        session.update(threshold=threshold, min_lesion_mm3=min_mm3)
        slicer_mask, web_mask = segment_on_input_grid(slicer_nodes), segment_on_input_grid(web.nodes)
        assert slicer_mask.any()
        assert np.array_equal(slicer_mask, web_mask)
        assert session.segment_voxels() == int(slicer_mask.sum())
        slicer_rows, web_rows = read_lesion_table(slicer_nodes.lesion_table), session.lesions()
        assert [(r["ID"], r["Volume"], r["Status"]) for r in slicer_rows] == [
            (r["ID"], r["Volume"], r["Status"]) for r in web_rows]
        for slicer_row, web_row in zip(slicer_rows, web_rows):  # two runs: float sums may differ in the last bits
            assert web_row["Mean score"] == pytest.approx(slicer_row["Mean score"], abs=1e-3)
    first = session.lesions()[0]["ID"]
    slicer_live.set_rejected(first, True)
    session.set_rejected(first, True)
    assert np.array_equal(segment_on_input_grid(slicer_nodes), segment_on_input_grid(web.nodes))
    for name in ("anomalies.seg.nrrd", "anomaly_map.nii.gz", "pseudo_healthy.nii.gz", "lesions.csv"):
        assert session.download(name)
    assert session.download("uncertainty_map.nii.gz") == b""  # dae-t1 gives none
    assert not any((access.work_dir / "downloads").iterdir())  # nothing left behind
    session.close()
    standalone.close()


@pytest.mark.reliability
def test_session_refuses_out_of_order_requests_and_cancel_leaves_nothing(files, demo_paths, reliability_case):
    access, _ = files
    standalone = create_scene()
    session = AnalysisSession(standalone.scene, access)
    with pytest.raises(SessionError, match="load a volume first"):
        session.start(default_model_name())
    with pytest.raises(SessionError, match="run a model first"):
        session.update(threshold=0.1)
    session.load(DEMO.image)
    with pytest.raises(SessionError, match="unknown model"):
        session.start("no-such-model")
    nodes_before = standalone.scene.GetNumberOfNodes()
    session.start(default_model_name())
    with pytest.raises(SessionError, match="already going"):
        session.start(default_model_name())
    with pytest.raises(SessionError, match="wait for the run"):
        session.load(DEMO.image)
    session.cancel()
    assert not session.running and session.results == []
    assert standalone.scene.GetNumberOfNodes() == nodes_before
    assert not any((access.work_dir / "runs").iterdir())  # the run's temporary folder is gone
    # A bad volume leaves the loaded input in place.
    with pytest.raises(InputVolumeError, match="label map") as label_map:
        session.load(DEMO.lesion_mask)
    assert session.input_volume is not None and session.input_volume.GetName() == "demo_t1"
    session.close()
    standalone.close()
    reliability_case("web app", "Cancel during a run", "child process stopped, no node added, its temporary "
                     "folder removed")
    reliability_case("web app", "Run while a run is going", "refused: a run is already going")
    reliability_case("web app", "a label map loaded as the input", f"refused, previous input kept: {label_map.value}")


@pytest.mark.reliability
@pytest.mark.parametrize("arguments, message", [
    (["--input", "/no/such/scan.nii.gz"], "no such file"),
    (["--max-upload-mb", "0"], "must be positive"),
    (["--data-dir", "/no/such/folder"], "is not a folder"),
])
def test_serve_refuses_bad_options_in_one_line(arguments, message, tmp_path, reliability_case):
    result = subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", "serve", "--port", "0",
                             "--work-dir", str(tmp_path / "work"), *arguments], capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("normative-anomaly: error:") and message in lines[0], lines
    reliability_case("web app", f"serve {' '.join(arguments)}", f"exit 1, no server started: {lines[0]}")


def test_a_server_open_to_the_network_warns_that_it_has_no_login():
    from NormativeAnomalyWeb.server import exposure_warning

    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.20", "::", "myserver.example.org"):
        warning = exposure_warning(host)
        assert warning.startswith("normative-anomaly: warning:") and "authenticating proxy" in warning
