"""Scoring, calibration, thresholding and the lesion table."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from NormativeAnomalyLib.lesions import LesionSegmenter, segment_anomalies
from NormativeAnomalyLib.scoring import (Calibration, anomaly_map, residual, residual_map, scoring_mask,
                                         structural_dissimilarity)


def test_calibration_thresholds_give_their_false_positive_rates():
    healthy = np.random.default_rng(0).gamma(2.0, 0.05, 200_000)
    calibration = Calibration.from_healthy_scores(healthy)
    for fpr in (0.001, 0.01, 0.05, 0.2):
        threshold = calibration.threshold_for_fpr(fpr)
        assert np.mean(healthy > threshold) == pytest.approx(fpr, rel=0.1)
        assert calibration.fpr_for_threshold(threshold) == pytest.approx(fpr, rel=1e-6)
    assert all(b <= a for a, b in zip(calibration.threshold, calibration.threshold[1:]))


def test_residual_modes():
    image, recon = np.array([1.0, 0.2, 0.5]), np.array([0.5, 0.6, 0.5])
    np.testing.assert_allclose(residual(image, recon, "absolute"), [0.5, 0.4, 0.0])
    np.testing.assert_allclose(residual(image, recon, "positive"), [0.5, 0.0, 0.0])
    np.testing.assert_allclose(residual(image, recon, "negative"), [0.0, 0.4, 0.0])
    np.testing.assert_allclose(residual(image, None, "positive"), image)


def test_input_weight_adds_the_inputs_own_signed_intensity_to_a_signed_residual():
    image, recon = np.array([1.2, 0.2, 0.5]), np.array([0.6, 0.6, 0.5])
    settings = {"residual": "positive", "median_filter_voxels": 0, "input_weight": 0.5}
    np.testing.assert_allclose(residual_map(image, recon, settings), [0.6 + 0.6, 0.1, 0.25], rtol=1e-6)
    np.testing.assert_allclose(residual_map(image, recon, dict(settings, residual="negative")),
                               [-0.6, 0.4 - 0.1, -0.25], rtol=1e-6)
    np.testing.assert_allclose(residual_map(image, None, settings), image, rtol=1e-6)  # intensity is the score already
    with pytest.raises(ValueError, match="signed residual"):
        residual_map(image, recon, dict(settings, residual="absolute"))


def test_ssim_weight_adds_structure_the_reconstruction_lacks_on_the_residuals_side():
    rng = np.random.default_rng(1)
    reconstruction = ndimage.gaussian_filter(rng.random((24, 24, 24)), 2.0)
    image = reconstruction.copy()
    image[8:16, 8:16, 8:16] += 0.3 * rng.random((8, 8, 8))  # bright texture the reconstruction lacks
    dissimilarity = structural_dissimilarity(image, reconstruction)
    assert np.all(structural_dissimilarity(reconstruction, reconstruction) < 1e-6)
    assert dissimilarity[12, 12, 12] > 10 * dissimilarity[2, 2, 2] >= 0
    settings = {"residual": "positive", "median_filter_voxels": 0}
    plain, with_ssim = residual_map(image, reconstruction, settings), residual_map(
        image, reconstruction, dict(settings, ssim_weight=2.0))
    assert with_ssim[12, 12, 12] > plain[12, 12, 12]
    # A darker patch is no evidence for a bright-lesion (positive) residual: SSIM adds nothing there.
    darker = reconstruction.copy()
    darker[8:16, 8:16, 8:16] -= 0.3 * rng.random((8, 8, 8))
    np.testing.assert_allclose(residual_map(darker, reconstruction, dict(settings, ssim_weight=2.0))[12, 12, 12],
                               residual_map(darker, reconstruction, settings)[12, 12, 12], atol=1e-6)


def test_anomaly_map_is_zero_outside_the_eroded_brain():
    brain = np.zeros((20, 20, 20), bool)
    brain[2:18, 2:18, 2:18] = True
    image = np.where(brain, 1.0, 0.0).astype(np.float32)
    scores = anomaly_map(image, np.zeros_like(image), brain, (2.0, 2.0, 2.0),
                         {"residual": "absolute", "median_filter_voxels": 3, "mask_erosion_mm": 4.0})
    inside = scoring_mask(brain, (2.0, 2.0, 2.0), 4.0)
    assert inside.sum() == 12**3  # 2 voxels (4 mm) off every face... distance > 4 mm keeps 12 per axis
    assert np.all(scores[~inside] == 0) and np.all(scores[inside] == 1)


def _map_with_blobs(spacing=(1.0, 2.0, 3.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, -1)) -> sitk.Image:
    values = np.zeros((30, 40, 50), np.float32)  # (z, y, x)
    values[5:10, 5:10, 5:10] = 2.0  # 125 voxels
    values[20:22, 30:32, 40:42] = 1.5  # 8 voxels
    values[25, 5, 45] = 3.0  # 1 voxel
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin((10.0, -20.0, 30.0))
    return image


def test_lesions_threshold_and_min_size():
    image = _map_with_blobs()
    voxel_mm3 = 6.0
    everything = segment_anomalies(image, 1.0, 0.0)
    assert [l.voxels for l in everything.lesions] == [125, 8, 1]
    assert [l.id for l in everything.lesions] == [1, 2, 3]
    assert everything.lesions[0].volume_ml == pytest.approx(125 * voxel_mm3 / 1000)
    assert everything.lesions[2].max_score == 3.0
    big = segment_anomalies(image, 1.0, 9 * voxel_mm3)
    assert [l.voxels for l in big.lesions] == [125]
    np.testing.assert_array_equal(big.mask, sitk.GetArrayFromImage(image) == 2.0)
    assert segment_anomalies(image, 1.8, 0.0).mask.sum() == 126
    assert segment_anomalies(image, 5.0, 0.0).lesions == []


def test_threshold_then_size_equals_size_then_threshold():
    image = _map_with_blobs()
    a = segment_anomalies(image, 1.0, 30.0)
    b = segment_anomalies(image, 1.0, 0.0)
    b = segment_anomalies(image, b.threshold, 30.0)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_lesion_centroid_is_in_ras():
    image = _map_with_blobs()
    lesion = segment_anomalies(image, 1.0, 0.0).lesions[0]
    lps = image.TransformContinuousIndexToPhysicalPoint((7.0, 7.0, 7.0))  # (x, y, z) index of the big blob's centre
    assert lesion.centroid_ras == pytest.approx((-lps[0], -lps[1], lps[2]), abs=0.01)


def test_interactive_segmenter_agrees_with_one_shot_segmentation_in_any_order():
    """The slider path (cached labelling, lesion box only) gives the one-shot result at every step."""
    rng = np.random.default_rng(3)
    image = _map_with_blobs()
    noisy = sitk.GetArrayFromImage(image) + rng.random((30, 40, 50), dtype=np.float32) * 1.2
    noisy[:, :, :3] = 0.0  # scores are zero outside the scoring mask
    map_image = sitk.GetImageFromArray(noisy)
    map_image.CopyInformation(image)
    segmenter = LesionSegmenter(map_image)
    steps = [(1.0, 0.0), (1.0, 30.0), (1.9, 30.0), (0.5, 0.0), (1.9, 0.0), (1.0, 30.0), (-1.0, 0.0), (9.0, 0.0)]
    for threshold, min_mm3 in steps:
        interactive = segmenter.segment(threshold, min_mm3)
        fresh = segment_anomalies(map_image, threshold, min_mm3)
        np.testing.assert_array_equal(interactive.labels, fresh.labels)
        assert interactive.lesions == fresh.lesions
        expected_voxels = int((noisy > threshold).sum()) if min_mm3 == 0 else None
        if expected_voxels is not None:
            assert interactive.mask.sum() == expected_voxels
    assert segmenter.segment(-1.0).mask.all()  # below zero, voxels outside the mask count too
    assert segmenter.segment(9.0).lesions == [] and not segmenter.segment(9.0).mask.any()


def test_rejected_lesion_is_listed_but_left_out_of_the_mask():
    image = _map_with_blobs()
    segmenter = LesionSegmenter(image)
    everything = segmenter.segment(1.0)
    small = everything.lesions[1]
    assert small.peak_ijk == (40, 30, 20)  # (i, j, k) of the 8-voxel blob's first highest voxel
    rejected = segmenter.segment(1.0, 0.0, [small.peak_ijk])
    assert [l.rejected for l in rejected.lesions] == [False, True, False]
    assert rejected.mask.sum() == everything.mask.sum() - small.voxels
    assert [l.id for l in rejected.kept] == [1, 3]
    # A seed outside every lesion (here: below a higher threshold) rejects nothing.
    assert not any(l.rejected for l in segmenter.segment(1.8, 0.0, [small.peak_ijk]).lesions)
