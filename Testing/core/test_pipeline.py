"""The pipeline as the Slicer and web front ends call it: progress, cancel, re-thresholding."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from NormativeAnomalyLib.errors import Cancelled
from NormativeAnomalyLib.lesions import segment_anomalies
from NormativeAnomalyLib.models import resolve_model
from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
from NormativeAnomalyLib.progress import Monitor
from NormativeAnomalyLib.volume_io import read_volume


@pytest.fixture(scope="module")
def dae_result(trained_dae, template_t1_path):
    stages: list[tuple[str, float]] = []
    image = read_volume(template_t1_path)
    result = detect_anomalies(image, trained_dae, RunOptions(registered=True, batch_size=16),
                              Monitor(progress=lambda stage, fraction: stages.append((stage, fraction))))
    return result, stages


def test_progress_covers_every_stage_and_ends_at_one(dae_result):
    _, stages = dae_result
    names = [name for name, _ in stages]
    assert "inference" in names and names[-1] == "done"
    inference = [fraction for name, fraction in stages if name == "inference"]
    assert inference == sorted(inference) and inference[-1] == 1.0 and len(inference) > 2


def test_outputs_share_the_input_grid(dae_result):
    result, _ = dae_result
    for image in (result.pseudo_healthy, result.anomaly_map, result.brain_mask):
        assert image.GetSize() == result.input_image.GetSize()
        assert image.GetOrigin() == result.input_image.GetOrigin()
        assert image.GetDirection() == result.input_image.GetDirection()


def test_pseudo_healthy_is_the_input_outside_the_brain(dae_result):
    result, _ = dae_result
    outside = sitk.GetArrayViewFromImage(result.brain_mask) == 0
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.pseudo_healthy)[outside],
                                  sitk.GetArrayViewFromImage(result.input_image)[outside])


def test_default_threshold_flags_about_the_calibrated_rate_on_the_calibration_scan(dae_result):
    """The tiny DAE was calibrated on this very scan: ~1% of eroded-brain voxels must exceed the threshold."""
    result, _ = dae_result
    scores = sitk.GetArrayViewFromImage(result.anomaly_map)
    defined = scores > 0
    assert result.threshold_fpr == pytest.approx(0.01)
    assert np.mean(scores[defined] > result.segmentation.threshold) == pytest.approx(0.01, abs=0.006)


def test_cancel_stops_the_run(trained_dae, template_t1_path):
    image = read_volume(template_t1_path)
    calls = {"n": 0}

    def cancel_during_inference() -> bool:
        calls["n"] += 1
        return calls["n"] > 4  # after the first stages, between inference batches

    with pytest.raises(Cancelled):
        detect_anomalies(image, trained_dae, RunOptions(registered=True, batch_size=4),
                         Monitor(cancel=cancel_during_inference))


@pytest.mark.slow
def test_intensity_baseline_on_a_real_head(real_t1_head_path):
    image = read_volume(real_t1_head_path)
    result = detect_anomalies(image, resolve_model("intensity-t1"), RunOptions(fpr=0.02, min_lesion_mm3=0))
    assert result.registration.kind == "affine"
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.pseudo_healthy),
                                  sitk.GetArrayViewFromImage(result.input_image))
    assert result.segmentation.mask.any()
    assert set(result.seconds) >= {"registration", "model_space", "inference", "scoring", "segmentation", "total"}
