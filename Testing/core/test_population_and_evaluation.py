"""The healthy population generator, the lesion kinds, evaluation metrics and 2-process training."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from conftest import micro_training_config
from NormativeAnomalyLib.evaluation import auprc, auroc, best_dice, detected_lesions, dice
from NormativeAnomalyLib.population import Anatomy, healthy_variants, spatial_variant
from NormativeAnomalyLib.simulation import LESION_KINDS, simulate_lesion

REPO = Path(__file__).resolve().parents[2]
NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}


@pytest.fixture(scope="module")
def anatomy(template) -> Anatomy:
    return Anatomy("template", sitk.GetArrayFromImage(template.image).astype(np.float32))


def test_population_is_deterministic_for_a_seed(anatomy, template):
    a, brain = healthy_variants(anatomy, template, 2, seed=5, normalisation=NORMALISATION)
    b, _ = healthy_variants(anatomy, template, 2, seed=5, normalisation=NORMALISATION)
    c, _ = healthy_variants(anatomy, template, 2, seed=6, normalisation=NORMALISATION)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (2, *brain.shape) and a.dtype == np.float16
    assert np.all(a[:, ~brain] == 0)
    # Normalised like inference: the 99th brain percentile sits near 1.
    assert np.percentile(a[0][brain].astype(np.float32), 99) == pytest.approx(1.0, abs=0.05)


def test_variants_differ_from_the_anatomy_but_stay_brain_like(anatomy, template):
    variants, brain = healthy_variants(anatomy, template, 3, seed=9, normalisation=NORMALISATION)
    original = sitk.GetArrayFromImage(template.image).astype(np.float32)
    for variant in variants.astype(np.float32):
        correlation = np.corrcoef(variant[brain], original[brain])[0, 1]
        # Changed (noise, contrast, warps of up to 8 deg and 8%: voxel-wise correlation ~0.3-0.6),
        # yet still brain-like intensities after normalisation (tissue between the percentiles).
        assert 0.2 < correlation < 0.98
        assert 0.3 < np.median(variant[brain]) < 0.95


def test_spatial_variants_keep_a_plausible_brain_volume(template):
    brain = sitk.GetArrayFromImage(template.brain_mask).astype(np.float32)
    for seed in range(5):
        warped = spatial_variant(brain, np.random.default_rng(seed), 2.0) > 0.5
        assert 0.75 < warped.sum() / brain.sum() < 1.3
        assert not np.array_equal(warped, brain > 0.5)


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_every_lesion_kind_changes_exactly_its_mask(template, kind):
    image = sitk.GetArrayFromImage(template.image).astype(np.float32)
    brain = sitk.GetArrayFromImage(template.brain_mask).astype(bool)
    lesion = simulate_lesion(kind, image, brain, (2.0, 2.0, 2.0), np.random.default_rng(100 + len(kind)))
    changed = ~np.isclose(lesion.image, lesion.displaced, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(changed, lesion.mask)
    assert lesion.mask.any() and not np.any(lesion.mask & ~ndimage.binary_dilation(brain, iterations=3))
    components = ndimage.label(lesion.mask)[1]
    if kind == "multifocal":
        assert components >= 2 and lesion.mask.sum() * 8 < 5000  # several small lesions, < 5 mL
    if kind == "territorial":
        assert lesion.mask.sum() * 8 > 10_000  # > 10 mL
    if kind in ("hypointense", "multifocal", "territorial"):
        assert lesion.image[lesion.mask].mean() < lesion.displaced[lesion.mask].mean()
    if kind == "hyperintense":
        assert lesion.image[lesion.mask].mean() > lesion.displaced[lesion.mask].mean()


def test_unknown_lesion_kind(template):
    with pytest.raises(ValueError, match="unknown lesion kind"):
        simulate_lesion("tumour", np.zeros((4, 4, 4)), np.ones((4, 4, 4), bool), (1, 1, 1), np.random.default_rng())


def _brute_auroc(scores, truth):
    positives, negatives = scores[truth], scores[~truth]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(positives, negatives)]
    return float(np.mean(pairs))


def _brute_average_precision(scores, truth):
    thresholds = np.unique(scores)[::-1]
    total, previous_recall = 0.0, 0.0
    for t in thresholds:
        flagged = scores >= t
        precision = (flagged & truth).sum() / flagged.sum()
        recall = (flagged & truth).sum() / truth.sum()
        total += precision * (recall - previous_recall)
        previous_recall = recall
    return total


def test_voxel_metrics_match_their_definitions():
    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.2
    scores = np.round(rng.random(300) + 0.6 * truth, 1)  # rounding makes ties
    assert auroc(scores, truth) == pytest.approx(_brute_auroc(scores, truth))
    assert auprc(scores, truth) == pytest.approx(_brute_average_precision(scores, truth))
    best, threshold = best_dice(scores, truth)
    assert best == pytest.approx(max(dice(scores >= t, truth) for t in np.unique(scores)))
    assert dice(scores >= threshold, truth) == pytest.approx(best)
    assert auroc(truth.astype(float), truth) == 1.0 and auprc(truth.astype(float), truth) == 1.0


def test_lesion_detection_counts_components():
    truth = np.zeros((20, 20, 20), bool)
    truth[2:4, 2:4, 2:4] = truth[10:12, 10:12, 10:12] = truth[15, 15, 15] = True
    predicted = np.zeros_like(truth)
    predicted[3, 3, 3] = predicted[15, 15, 15] = True
    assert detected_lesions(predicted, truth) == (2, 3)


@pytest.mark.slow
def test_two_process_torchrun_training(tmp_path, template_t1_path):
    """The DistributedDataParallel path: torchrun, 2 CPU processes (gloo), one package written."""
    config = micro_training_config("dae-ddp", template_t1_path, seed=3, steps=4, out=str(tmp_path / "package"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "NormativeAnomaly"))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "scripts" / "train.py"), str(tmp_path / "config.json")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((tmp_path / "package" / "model.json").read_text())
    assert card["training"]["processes"] == 2 and card["training"]["steps"] == 4
    assert (tmp_path / "package" / "training_loss.png").is_file()


@pytest.mark.slow
def test_models_are_compared_on_shared_registrations(tmp_path, demo_paths, trained_dae, monkeypatch):
    """evaluation.evaluate_model for two models on one lesion case: the case is registered once."""
    from NormativeAnomalyLib import evaluation

    calls = []
    real_register = evaluation.register_to_template
    monkeypatch.setattr(evaluation, "register_to_template",
                        lambda *args, **kwargs: calls.append(1) or real_register(*args, **kwargs))
    cases = [{"case": "demo", "image": demo_paths[0], "mask": demo_paths[1], "type": "lesion"}]
    registrations = evaluation.Registrations()
    results = [evaluation.evaluate_model(model, cases, {"demo"}, registrations)
               for model in ("intensity-t1", str(trained_dae.path))]
    assert len(calls) == 1  # one case, not one case x two models
    assert [r["model"] for r in results] == ["intensity-t1", trained_dae.name]
    for result in results:
        assert 0 <= result["types"]["lesion"]["auprc"] <= 1 and result["seconds_per_volume"] > 0
        assert set(result["maps"]) == {"demo"}


@pytest.mark.slow
def test_evaluation_script_writes_a_table_and_a_figure_and_reuses_its_cache(tmp_path, demo_paths, tiny_t1_path,
                                                                            trained_dae):
    """scripts/evaluate.py on a lesion case and a healthy scan with two models: one table row per
    model, the figure with a row per model; run again, everything comes from the cache."""
    import shutil

    data = tmp_path / "cases"
    data.mkdir()
    shutil.copy(demo_paths[0], data / "demo_image.nii.gz")
    shutil.copy(demo_paths[1], data / "demo_mask.nii.gz")
    shutil.copy(tiny_t1_path, data / "head_image.nii.gz")
    out = tmp_path / "evaluation"
    command = [sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"),
               "--data", str(data), "--models", "intensity-t1", str(trained_dae.path), "--out", str(out),
               "--cache", str(tmp_path / "cache")]
    first_run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert first_run.returncode == 0, first_run.stderr[-2000:]
    first = (out / "results.json").read_text()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("from the cache") == 2 and (out / "results.json").read_text() == first
    results = json.loads(first)
    assert [r["model"] for r in results] == ["intensity-t1", trained_dae.name]
    for result in results:
        assert set(result["types"]) == {"lesion"} and set(result["healthy_flagged_ml"]) == {"head"}
        assert 0 <= result["types"]["lesion"]["auprc"] <= 1 and result["seconds_per_volume"] > 0
    table = (out / "results.md").read_text(encoding="utf-8")
    assert table.count("| intensity-t1 |") == 2 and table.count(f"| {trained_dae.name} |") == 2
    import matplotlib.image

    height, width = matplotlib.image.imread(out / "examples.png").shape[:2]
    assert width > height  # two cases x 3 panels across, two model rows down
