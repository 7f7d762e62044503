"""The web app in a real browser (Debian's Chromium through Playwright) against ``normative-anomaly serve``.

The server runs as users start it, in its own process on a free loopback port. What the page
shows is checked against the server's own state (the segment's voxel count is read back from
the segmentation node) and against files downloaded through the page (read with slicerio and
SimpleITK), and those against the anomaly map recomputed here.
Screenshots go to out/screenshots/ (docs/web.md's screenshot is one of them).
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

pytest.importorskip("trame_slicer", reason="the web requirements are not installed")
pytest.importorskip("playwright", reason="the web requirements are not installed")

from NormativeAnomalyWeb.browser import (browser_available, browser_page, click_slider, frames,  # noqa: E402
                                         run_model, segment_voxels, server_log, wait_for_frame, wait_for_quiet,
                                         web_server)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "out" / "screenshots"
REQUIRED = os.environ.get("NORMATIVE_ANOMALY_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails

if not browser_available():
    if REQUIRED:
        raise RuntimeError("Chromium is missing (apt-get install chromium libosmesa6)")
    pytest.skip("no /usr/bin/chromium (apt-get install chromium libosmesa6)", allow_module_level=True)

pytestmark = pytest.mark.slow
MAX_UPLOAD_MB = 1  # below the demo case's 2.5 MB: the refusal is tested with it


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    work = tmp_path_factory.mktemp("web")
    with web_server(work, "--max-upload-mb", str(MAX_UPLOAD_MB)) as url:
        try:
            yield url, work
        except BaseException:
            print(server_log(work / "server.log"))
            raise


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name))


def download(page, what: str, folder: Path) -> Path:
    with page.expect_download(timeout=60_000) as pending:
        page.click(f"#download-{what}")
    path = folder / pending.value.suggested_filename
    pending.value.save_as(path)
    return path


def wait_for_voxels_change(page, before: int) -> int:
    page.wait_for_function(f"Number(document.querySelector('#lesion-summary').dataset.voxels) !== {before}",
                           timeout=20_000)
    return segment_voxels(page)


def expected_voxels(anomaly_map: Path, threshold: float, min_mm3: float) -> int:
    """The segmentation recomputed from the downloaded anomaly map (26-connected components)."""
    image = sitk.ReadImage(str(anomaly_map))
    values = sitk.GetArrayFromImage(image)
    components, count = ndimage.label(values > threshold, structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1) * float(np.prod(image.GetSpacing()))
    keep = np.flatnonzero(sizes >= max(min_mm3, 1e-9))
    return int(np.isin(components, keep[keep > 0]).sum())


def state(page, name: str):
    return page.evaluate(f"trame.state.get({name!r})")


@pytest.mark.slow
def test_demo_in_the_browser(served, tmp_path):
    url, _work = served
    with browser_page(url) as page:
        assert "demo_t1" in page.inner_text("#input-name")  # opens on the demo case
        run_model(page)
        wait_for_quiet(page)
        screenshot(page, "web-app.png")

        # The threshold slider: the segment on the server follows, both ways.
        at_start = segment_voxels(page)
        assert at_start > 0
        anomaly_map = download(page, "anomaly_map", tmp_path)
        assert segment_voxels(page) == expected_voxels(anomaly_map, state(page, "threshold"), state(page, "min_size"))
        click_slider(page, "threshold-slider", 0.8)
        higher = wait_for_voxels_change(page, at_start)
        assert higher < at_start
        assert segment_voxels(page) == expected_voxels(anomaly_map, state(page, "threshold"), state(page, "min_size"))
        assert float(page.inner_text("#fpr-label").split("rate")[1].strip(" %")) < 1.0  # fewer healthy positives
        click_slider(page, "threshold-slider", 0.12)
        lower = wait_for_voxels_change(page, higher)
        assert lower > at_start
        assert segment_voxels(page) == expected_voxels(anomaly_map, state(page, "threshold"), state(page, "min_size"))

        # The threshold typed as a healthy false-positive rate.
        page.fill("#fpr-input", "5")
        page.press("#fpr-input", "Enter")
        page.wait_for_function("Math.abs(trame.state.get('fpr_percent') - 5) < 0.5", timeout=10_000)
        lower = segment_voxels(page)
        assert segment_voxels(page) == expected_voxels(anomaly_map, state(page, "threshold"), state(page, "min_size"))

        # The minimum size slider drops the small lesions.
        rows_before = page.locator("#lesion-table tbody tr").count()
        click_slider(page, "min-size-slider", 0.3)  # about 1500 mm³ (a click near the thumb would not move it)
        page.wait_for_function(f"document.querySelectorAll('#lesion-table tbody tr').length < {rows_before}",
                               timeout=20_000)
        assert 1300 < state(page, "min_size") < 1700
        wait_for_voxels_change(page, lower)
        assert segment_voxels(page) == expected_voxels(anomaly_map, state(page, "threshold"), state(page, "min_size"))

        # A row click centres the views on the lesion: the axial view is redrawn at another slice.
        wait_for_quiet(page)
        rows = page.locator("#lesion-table tbody tr")
        last = rows.nth(rows.count() - 1)
        lesion_id = int(last.get_attribute("data-lesion"))
        axial_frames = frames(page, 0)
        last.click()
        page.wait_for_function(f"trame.state.get('selected_lesion') === {lesion_id}", timeout=10_000)
        wait_for_frame(page, 0, axial_frames)
        assert "bg-blue-lighten-4" in last.get_attribute("class")
        wait_for_quiet(page)
        screenshot(page, "slicer-views.png")  # docs/slicer.md's picture of the views (docs/images/slicer_views.png)

        # Reject it: it stays in the table as rejected and leaves the segment.
        volume_ml = float(last.locator("td").nth(1).inner_text())
        kept_voxels = segment_voxels(page)
        last.locator(".reject-button").click()
        page.wait_for_function(f"document.querySelector('tr[data-lesion=\"{lesion_id}\"]').textContent"
                               ".includes('rejected')", timeout=10_000)
        assert "1 rejected" in page.inner_text("#lesion-summary")
        voxel_ml = float(np.prod(sitk.ReadImage(str(anomaly_map)).GetSpacing())) / 1000
        assert segment_voxels(page) == pytest.approx(kept_voxels - volume_ml / voxel_ml, abs=1)

        # Downloads: the segmentation as the server holds it, and the lesion table.
        import slicerio

        segmentation = slicerio.read_segmentation(str(download(page, "segmentation", tmp_path)))
        anomaly = next(s for s in segmentation["segments"] if s["id"] == "Anomaly")
        voxels = slicerio.extract_segments(segmentation, [(anomaly["name"], 1)])["voxels"]
        assert int((voxels == 1).sum()) == segment_voxels(page)
        with open(download(page, "lesions", tmp_path), newline="") as stream:
            table = list(csv.DictReader(stream))
        assert len(table) == page.locator("#lesion-table tbody tr").count()
        assert [row["Status"] for row in table].count("rejected") == 1

        # Fade to the pseudo-healthy reconstruction: the views are redrawn.
        axial_frames = frames(page, 0)
        click_slider(page, "fade-slider", 0.9)
        wait_for_frame(page, 0, axial_frames)
        wait_for_quiet(page)
        screenshot(page, "web-app-pseudo-healthy.png")


def wait_for_segment_to_match(page, anomaly_map: Path, timeout_s: float = 15.0) -> tuple[float, int]:
    """Wait until the server's segment is the anomaly map thresholded at the threshold the page shows
    (and at its minimum size); returns that threshold and the voxel count. A dropped slider step
    leaves them apart for good."""
    deadline = time.monotonic() + timeout_s
    expected: dict[tuple[float, float], int] = {}
    while True:
        settings = (state(page, "threshold"), state(page, "min_size"))
        if settings not in expected:
            expected[settings] = expected_voxels(anomaly_map, *settings)
        voxels = segment_voxels(page)
        if voxels == expected[settings]:
            return settings[0], voxels
        if time.monotonic() > deadline:
            raise AssertionError(f"the segment has {voxels} voxels {timeout_s} s after the last slider move; the "
                                 f"threshold the page shows ({settings[0]}) gives {expected[settings]}")
        page.wait_for_timeout(200)


@pytest.mark.slow
def test_the_segment_follows_every_last_slider_move(served, tmp_path):
    """Slider moves that arrive while the previous step is being applied (or its table is being sent)
    must not be lost: the last value always wins."""
    url, _work = served
    with browser_page(url) as page:
        run_model(page)  # a result of its own: no rejected lesions, the default minimum size
        wait_for_quiet(page)
        anomaly_map = download(page, "anomaly_map", tmp_path)
        start, _ = wait_for_segment_to_match(page, anomaly_map)

        # Back to back: the second move as soon as the first one's segment has arrived.
        for _ in range(3):
            before = segment_voxels(page)
            click_slider(page, "threshold-slider", 0.8)
            wait_for_voxels_change(page, before)
            click_slider(page, "threshold-slider", 0.12)
            low, _ = wait_for_segment_to_match(page, anomaly_map)
            assert low < start
        # Two moves with no pause between them.
        click_slider(page, "threshold-slider", 0.8)
        click_slider(page, "threshold-slider", 0.3)
        wait_for_segment_to_match(page, anomaly_map)

        # Many moves, quickly, at random gaps shorter than one update.
        rng = np.random.default_rng(7)
        for burst in range(3):
            for fraction, gap_ms in zip(rng.uniform(0.05, 0.95, 12), rng.uniform(0, 150, 12)):
                click_slider(page, "threshold-slider", float(fraction))
                page.wait_for_timeout(float(gap_ms))
            if burst == 2:  # the minimum size too, in the same burst
                click_slider(page, "min-size-slider", 0.2)
                click_slider(page, "threshold-slider", 0.1)
            threshold, voxels = wait_for_segment_to_match(page, anomaly_map)
            assert voxels > 0 or threshold > start
        assert state(page, "min_size") > 0


@pytest.mark.slow
def test_switching_between_models_results(served):
    url, _work = served
    with browser_page(url) as page:  # the server keeps the first test's result: the session is the server's
        if not state(page, "results"):
            run_model(page)
        shown, shown_voxels = state(page, "result"), segment_voxels(page)
        count = len(state(page, "results"))
        run_model(page, "ae-t1")
        results = state(page, "results")
        assert len(results) == count + 1 and results[-1]["title"] == "ae-t1" and state(page, "result") == count
        page.evaluate(f"trame.state.set('result', {shown})")
        page.wait_for_function(f"Number(document.querySelector('#lesion-summary').dataset.voxels) === {shown_voxels}",
                               timeout=20_000)


@pytest.mark.slow
def test_cancel_stops_the_run_and_adds_no_result(served):
    url, work = served
    with browser_page(url) as page:
        results = len(state(page, "results"))
        page.click("#run-button")
        page.wait_for_function("trame.state.get('running') && trame.state.get('progress') > 0", timeout=60_000)
        page.click("#cancel-button")
        page.wait_for_function("document.querySelector('#status').textContent.includes('Cancelled')", timeout=30_000)
        assert not state(page, "running") and len(state(page, "results")) == results
        assert not any((work / "server" / "runs").iterdir())  # the run's temporary folder is gone
        assert page.is_enabled("#run-button")


@pytest.mark.reliability
def test_uploads_are_bounded_and_bad_volumes_refused(served, tmp_path, real_t1_head_path, demo_paths,
                                                      reliability_case):
    url, work = served
    with browser_page(url) as page:
        # Over the limit: refused in the page, nothing sent, nothing written.
        page.set_input_files("#upload-input", str(demo_paths[0]))
        page.wait_for_function("document.querySelector('#error').textContent.includes('over the upload limit')",
                               timeout=10_000)
        uploads = work / "server" / "uploads"
        assert not any(uploads.rglob("*.nii.gz"))
        reliability_case("web app", f"an upload over --max-upload-mb {MAX_UPLOAD_MB} (in the browser)",
                         f"not sent, nothing written: {page.inner_text('#error').strip()}")
        # Within the limit: saved in the work folder and opened.
        page.set_input_files("#upload-input", str(real_t1_head_path))
        page.wait_for_function("document.querySelector('#input-name').textContent.includes('itk_kmeans_t1')",
                               timeout=30_000)
        assert len(list(uploads.rglob("itk_kmeans_t1.nii.gz"))) == 1
        # Not a volume: a one-line error, the input stays.
        junk = tmp_path / "junk.nii.gz"
        junk.write_bytes(b"not an image" * 100)
        page.set_input_files("#upload-input", str(junk))
        page.wait_for_function("document.querySelector('#error').textContent.includes('junk')", timeout=30_000)
        assert "\n" not in page.inner_text("#error").strip()
        assert str(work) not in page.inner_text("#error")  # server paths stay on the server
        assert "itk_kmeans_t1" in page.inner_text("#input-name")
        reliability_case("web app", "an upload that is not an image (in the browser)",
                         f"previous input kept: {page.inner_text('#error').strip()}")
        # A typed path outside the shared folders: refused, the input stays.
        page.evaluate("trame.state.set('error', ''); trame.state.set('volume', '/etc/passwd')")
        page.click("#load-button")
        page.wait_for_function("document.querySelector('#error').textContent.includes('not in a folder this server "
                               "shares')", timeout=10_000)
        assert "itk_kmeans_t1" in page.inner_text("#input-name")
        reliability_case("web app", "/etc/passwd typed into the volume box (in the browser)",
                         f"not read, previous input kept: {page.inner_text('#error').strip()}")
