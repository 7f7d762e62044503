"""Location-aware scoring: healthy residual statistics per template voxel, their fit, calibration and package."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from NormativeAnomalyLib.errors import ModelPackageError
from NormativeAnomalyLib.models.package import load_package, write_package
from NormativeAnomalyLib.normative import STORAGE_STRIDE, NormativeStatistics, deviation_map
from NormativeAnomalyLib.training.normative import ScanSums, cross_fitted_calibration, fit_statistics
from NormativeAnomalyLib.training.scans import healthy_region

SHAPE = (24, 28, 24)
SPACING = (2.0, 2.0, 2.0)


def _brain() -> np.ndarray:
    zz, yy, xx = np.indices(SHAPE)
    return ((zz - 12) / 10) ** 2 + ((yy - 14) / 12) ** 2 + ((xx - 12) / 10) ** 2 < 1


def _hot_spot() -> np.ndarray:
    """Where every healthy scan's residual is high (a ventricle border the model always misses)."""
    spot = np.zeros(SHAPE, bool)
    spot[10:14, 8:12, 10:14] = True
    return spot


def _healthy_residual(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.05 + 0.01 * rng.standard_normal(SHAPE) + 0.3 * _hot_spot()).astype(np.float32)


def _sums(count: int, smoothing_voxels: float = 1.0) -> list[ScanSums]:
    brain = _brain()
    return [ScanSums.of(f"scan{i}", _healthy_residual(i), brain, brain, smoothing_voxels) for i in range(count)]


def test_a_place_every_healthy_scan_misses_is_calm_and_a_lesion_elsewhere_stands_out():
    brain = _brain()
    statistics = fit_statistics(_sums(8))
    scan = _healthy_residual(100)
    lesion = np.zeros(SHAPE, bool)
    lesion[10:13, 18:21, 10:13] = True
    scan[lesion] += 0.15  # half as strong as the healthy hot spot
    plain = np.where(brain, scan, 0)
    located = deviation_map(scan, brain, statistics, scan_scaled=False)
    # The plain residual is highest at the healthy hot spot; the deviation is highest at the lesion.
    assert plain[_hot_spot()].mean() > plain[lesion].mean()
    assert located[lesion].min() > located[_hot_spot()].max()
    assert located.min() >= 0 and np.all(located[~brain] == 0)


def test_cross_fitted_thresholds_flag_their_rate_on_a_new_healthy_scan():
    sums = _sums(8)
    calibration = cross_fitted_calibration(sums, scan_scaled=False)
    statistics = fit_statistics(sums)
    new = deviation_map(_healthy_residual(200), _brain(), statistics, scan_scaled=False)[_brain()]
    for fpr in (0.01, 0.05):
        assert np.mean(new > calibration.threshold_for_fpr(fpr)) == pytest.approx(fpr, rel=0.5)


def test_scoring_the_scans_the_statistics_came_from_would_set_thresholds_too_low():
    """Why the calibration is cross-fitted: in-sample deviations are too small (the more so, the
    fewer scans and the less smoothing)."""
    sums = _sums(4, smoothing_voxels=0.0)
    statistics = fit_statistics(sums)
    in_sample = np.concatenate([deviation_map(s.score, s.scored, statistics, False)[s.healthy] for s in sums])
    cross_fitted = cross_fitted_calibration(sums, scan_scaled=False)
    assert np.quantile(in_sample, 0.99) < 0.8 * cross_fitted.threshold_for_fpr(0.01)


def test_a_scan_twice_as_noisy_keeps_its_rate_when_scan_scaled():
    sums = _sums(8)
    statistics = fit_statistics(sums)
    calibrated = {scaled: cross_fitted_calibration(sums, scaled).threshold_for_fpr(0.01) for scaled in (False, True)}
    noisy = 0.05 + 0.02 * np.random.default_rng(300).standard_normal(SHAPE) + 0.3 * _hot_spot()
    rates = {scaled: np.mean(deviation_map(noisy, _brain(), statistics, scaled)[_brain()] > calibrated[scaled])
             for scaled in (False, True)}
    assert rates[False] > 0.05  # unscaled, a noisier scanner floods the map
    assert rates[True] == pytest.approx(0.01, rel=0.5)


def test_lesions_and_their_margin_are_not_healthy():
    brain = _brain()
    lesion = np.zeros(SHAPE, bool)
    lesion[12, 14, 12] = True
    healthy = healthy_region(brain, lesion, SPACING, margin_mm=6.0)
    distance = ndimage.distance_transform_edt(~lesion, sampling=SPACING)
    assert not healthy[distance <= 6.0].any()
    assert healthy[brain & (distance > 6.0)].all()
    assert np.array_equal(healthy_region(brain, None, SPACING), brain)


def test_statistics_survive_storage_at_every_second_voxel():
    ramp = np.add.outer(np.add.outer(np.arange(SHAPE[0]) * 0.01, np.arange(SHAPE[1]) * 0.02),
                        np.arange(SHAPE[2]) * 0.005).astype(np.float32)
    statistics = NormativeStatistics(ramp, 0.1 + ramp)
    back = NormativeStatistics.from_tensors(statistics.to_tensors(), SHAPE)
    # A linear ramp is what linear interpolation restores exactly (away from the clamped last row).
    inner = tuple(slice(0, n - STORAGE_STRIDE) for n in SHAPE)
    np.testing.assert_allclose(back.mean[inner], ramp[inner], atol=1e-5)
    assert statistics.to_tensors()["mean"].nbytes * 7 < ramp.nbytes


@pytest.fixture
def package_with_statistics(trained_dae, tmp_path):
    shape = tuple(reversed(trained_dae.card["grid"]["size"]))
    statistics = NormativeStatistics(np.full(shape, 0.05, np.float32), np.full(shape, 0.02, np.float32))
    card = {**trained_dae.card, "scoring": {**trained_dae.card["scoring"],
                                            "normative": {"data": "a test", "smoothing_mm": 4.0, "cases": ["a"]}}}
    folder = tmp_path / "with-statistics"
    shutil.copytree(trained_dae.path, folder)
    return write_package(folder, card, None, overwrite=True, normative=statistics)


def test_a_package_carries_its_statistics_and_the_pipeline_uses_them(package_with_statistics, template_t1_path):
    import SimpleITK as sitk

    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies

    package = load_package(package_with_statistics.path)
    assert package.normative is not None and np.allclose(package.normative.mean, 0.05)
    image = sitk.ReadImage(str(template_t1_path), sitk.sitkFloat32)
    result = detect_anomalies(image, package, RunOptions(device="cpu", registered=True))
    plain = detect_anomalies(image, dataclasses.replace(package, normative=None),
                             RunOptions(device="cpu", registered=True))
    located, residual = sitk.GetArrayFromImage(result.anomaly_map), sitk.GetArrayFromImage(plain.anomaly_map)
    inside = residual > 0
    np.testing.assert_allclose(located[inside], np.maximum((residual[inside] - 0.05) / 0.02, 0), rtol=1e-4, atol=1e-4)


def test_a_tampered_or_misshapen_statistics_file_is_refused(package_with_statistics):
    folder = package_with_statistics.path
    path = folder / "normative.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelPackageError, match="does not match the SHA-256"):
        load_package(folder)
    from safetensors.numpy import save

    from NormativeAnomalyLib.templates import sha256_of

    path.write_bytes(save({"mean": np.zeros((3, 3, 3), np.float32), "spread": np.ones((3, 3, 3), np.float32)}))
    card = json.loads((folder / "model.json").read_text())
    card["scoring"]["normative"]["sha256"] = sha256_of(path)
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(ModelPackageError, match="must be finite numbers of shape"):
        load_package(folder)
    path.unlink()
    with pytest.raises(ModelPackageError, match="normative statistics file normative.safetensors is missing"):
        load_package(folder)


BRATS = Path(__file__).resolve().parents[3] / "shared" / "data" / "brats-dev"


@pytest.mark.slow
@pytest.mark.skipif(not BRATS.is_dir(), reason="the BraTS development cases (../shared/data/brats-dev) are not here")
def test_on_a_real_flair_scan_statistics_from_two_other_patients_beat_its_intensity_alone():
    """The bundled FLAIR model's recipe, fitted on two real cases' healthy tissue, ranks the tumour
    of a third above its healthy tissue better than its normalised intensity does (two cases are too
    few to calibrate a threshold by: scripts/evaluate_brats.py scores that with nine)."""
    import SimpleITK as sitk

    from NormativeAnomalyLib.evaluation import auprc
    from NormativeAnomalyLib.models import resolve_model
    from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
    from NormativeAnomalyLib.training.normative import leave_out, scan_sums

    package = resolve_model("intensity-flair")
    plain = dataclasses.replace(package, normative=None)
    read = lambda case, kind: sitk.ReadImage(str(BRATS / f"{case}_{kind}.nii.gz"), sitk.sitkFloat32)  # noqa: E731
    sums = [scan_sums(plain, read(case, "flair"), read(case, "seg"), case, 4.0)[0]
            for case in ("Brats18_CBICA_ABM_1", "Brats18_TCIA10_628_1")]
    held_out = "Brats18_TCIA02_606_1"
    fold = leave_out(package, sums, {held_out})
    assert fold.normative is not package.normative
    image = read(held_out, "flair")
    run = detect_anomalies(image, fold, RunOptions(device="cpu"))
    assert run.skull_stripped
    values = sitk.GetArrayFromImage(image)
    truth = sitk.GetArrayFromImage(read(held_out, "seg")) > 0
    brain = (values > 0) | truth
    low, high = np.percentile(values[brain], [1, 99])
    intensity_alone = auprc(((values - low) / (high - low))[brain], truth[brain])
    located = auprc(sitk.GetArrayFromImage(run.anomaly_map)[brain], truth[brain])
    assert located > intensity_alone, (located, intensity_alone)


def test_each_case_is_scored_by_a_network_that_did_not_learn_from_it(trained_dae):
    from NormativeAnomalyLib.evaluation import package_for
    from NormativeAnomalyLib.training.normative import fold_networks

    def trained_on(cases, **card):
        training = {**trained_dae.card["training"], "cases": cases}
        return dataclasses.replace(trained_dae, card={**trained_dae.card, **card, "training": training})

    scoring = {**trained_dae.card["scoring"], "residual": "positive", "scan_normalisation": "median"}
    shipped = trained_on(["a", "b", "c", "d"], scoring=scoring)
    fold_ab, fold_cd = trained_on(["a", "b"]), trained_on(["c", "d"])
    networks = fold_networks(shipped, [fold_ab, fold_cd])
    assert [package_for(case, networks).card["training"]["cases"] for case in "abce"] == \
        [["c", "d"], ["c", "d"], ["a", "b"], ["a", "b", "c", "d"]]
    # A fold lends only its network: it is scored and calibrated as the shipped package is.
    assert all(n.card["scoring"] == scoring and n.normative is None for n in networks)
    assert networks[1].state_dict is fold_ab.state_dict
    with pytest.raises(ValueError, match="learnt from a and none of its folds"):
        package_for("a", fold_networks(shipped, [fold_ab]))
