"""Shared fixtures: real MRI (small files shipped in Testing/Data and Resources/), and a
small denoising autoencoder really trained once per test session (about 20 s on 2 cores)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "NormativeAnomaly"))  # the core library, without installing it
# Child processes write UTF-8 (tqdm's bars) whatever the machine's locale; the tests decode it so.
os.environ.setdefault("PYTHONIOENCODING", "utf-8")

DATA = Path(__file__).resolve().parent / "Data"

# Property and fuzz tests draw the same examples on every run, so a test run (and CI) is
# reproducible; NORMATIVE_ANOMALY_HYPOTHESIS=explore draws new ones to look for new bugs.
try:
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("reproducible", derandomize=True)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("NORMATIVE_ANOMALY_HYPOTHESIS", "reproducible"))
except ImportError:  # hypothesis is a test requirement; without it those tests are not collected
    pass
TEMPLATE_NAME = "icbm152_2009c_t1_2mm"


@pytest.fixture(scope="session")
def real_t1_head_path() -> Path:
    """A real single-subject T1 head with skull, 128x128x62 at 2x2x3 mm, oblique direction."""
    return DATA / "itk_kmeans_t1.nii.gz"


@pytest.fixture(scope="session")
def tiny_t1_path() -> Path:
    """A real T1, 33x41x25 at 2 mm."""
    return DATA / "nibabel_anatomical.nii.gz"


@pytest.fixture(scope="session")
def demo_paths() -> tuple[Path, Path]:
    from NormativeAnomalyLib.resources import demo_case

    demo = demo_case()
    return demo.image, demo.lesion_mask


@pytest.fixture(scope="session")
def template():
    from NormativeAnomalyLib.templates import load_template

    return load_template(TEMPLATE_NAME)


@pytest.fixture(scope="session")
def template_t1_path(template, tmp_path_factory) -> Path:
    """The template image as a file already in template space (registration can be skipped)."""
    path = tmp_path_factory.mktemp("template") / "template_t1.nii.gz"
    sitk.WriteImage(template.image, str(path))
    return path


@pytest.fixture(scope="session")
def trained_dae_run(tmp_path_factory, template_t1_path):
    """(package, per-step losses) of a real (tiny) DAE: trained for a few dozen steps on the
    template, calibrated on it."""
    from NormativeAnomalyLib.training import train_model

    out = tmp_path_factory.mktemp("models") / "dae-test"
    losses: list[float] = []
    package = train_model({
        "name": "dae-test", "template": TEMPLATE_NAME, "registered": True, "seed": 7,
        "train_volumes": [str(template_t1_path)], "calibration_volumes": [str(template_t1_path)],
        "network": {"name": "UNet", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                                             "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
        "steps": 60, "batch_size": 8, "learning_rate": 3e-3, "out": str(out),
        "training_data": "the ICBM 2009c template itself (a test model)",
    }, progress=lambda step, loss: losses.append(loss))
    return package, losses


@pytest.fixture(scope="session")
def trained_dae(trained_dae_run):
    return trained_dae_run[0]


def micro_training_config(name: str, volume: Path, **overrides) -> dict:
    """A training config small enough to run in seconds (a 2-level U-Net with 4 and 8 channels)."""
    return {
        "name": name, "template": TEMPLATE_NAME, "registered": True, "seed": 1,
        "train_volumes": [str(volume)], "calibration_volumes": [str(volume)],
        "network": {"name": "UNet", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                                             "channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "batch_size": 2,
    } | overrides


def sitk_from_array(values: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(like)
    return image


# --- The reliability record (docs/reliability.md) -------------------------------------------
# A bad-input or fault test calls ``reliability_case(area, case, behaviour, lost_nothing=...)``
# after its assertions. With ``--reliability-log FILE`` each recorded case is appended to FILE
# as one JSON line with the test's outcome; scripts/reliability_report.py renders the table.

def pytest_addoption(parser):
    parser.addoption("--reliability-log", default=None,
                     help="append each reliability case (bad input, fault) as a JSON line to this file")


@pytest.fixture
def reliability_case(request):
    """record(area, case, behaviour, *, lost_nothing=True, ran_no_code=True): one table row.

    ``behaviour`` is what the tool did, e.g. the error message it printed (quote the real one);
    the flags state what the test checked: no user file changed, nothing executed.
    """
    rows = request.node.reliability_rows = []

    def record(area: str, case: str, behaviour: str, *, lost_nothing: bool = True, ran_no_code: bool = True) -> None:
        rows.append({"area": area, "case": case, "behaviour": " ".join(str(behaviour).split()),
                     "lost_nothing": bool(lost_nothing), "ran_no_code": bool(ran_no_code)})
    return record


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    log = item.config.getoption("--reliability-log")
    rows = getattr(item, "reliability_rows", None)
    if not log or not rows or report.when != "call":
        return
    import json

    with open(log, "a", encoding="utf-8") as stream:
        for row in rows:
            stream.write(json.dumps(row | {"test": item.nodeid, "passed": report.passed}) + "\n")
