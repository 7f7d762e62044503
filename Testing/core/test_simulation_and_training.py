"""The lesion simulator (exact masks) and a real, short training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from conftest import micro_training_config, sitk_from_array
from NormativeAnomalyLib.inference import reconstruct
from NormativeAnomalyLib.model_space import prepare_model_input
from NormativeAnomalyLib.models import load_package
from NormativeAnomalyLib.models.networks import build_network
from NormativeAnomalyLib.registration import identity_registration
from NormativeAnomalyLib.simulation import simulate_mass
from NormativeAnomalyLib.training import coarse_noise
from NormativeAnomalyLib.training.scans import LESION_SUFFIX


def _brain(template):
    return (sitk.GetArrayFromImage(template.image).astype(np.float32),
            sitk.GetArrayFromImage(template.brain_mask).astype(bool))


def test_lesion_mask_matches_the_changed_voxels(template):
    image, brain = _brain(template)
    lesion = simulate_mass(image, brain, (2.0, 2.0, 2.0), np.random.default_rng(3), radius_mm=10, contrast=-0.5)
    changed = ~np.isclose(lesion.image, lesion.displaced, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(changed, lesion.mask)
    assert lesion.mask.sum() > 50 and np.all(brain[lesion.mask] | ~brain[lesion.mask])
    # Darker, by about the asked contrast.
    ratio = lesion.image[lesion.mask].mean() / lesion.displaced[lesion.mask].mean()
    assert 0.4 < ratio < 0.75


def test_mass_effect_moves_tissue_outside_the_mask(template):
    image, brain = _brain(template)
    lesion = simulate_mass(image, brain, (2.0, 2.0, 2.0), np.random.default_rng(5), radius_mm=10, mass_effect_mm=4)
    outside = ~lesion.mask & brain
    assert np.abs(lesion.displaced[outside] - image[outside]).max() > 50  # tissue pushed, not only painted
    none = simulate_mass(image, brain, (2.0, 2.0, 2.0), np.random.default_rng(5), radius_mm=10, mass_effect_mm=0)
    np.testing.assert_allclose(none.displaced, image, atol=1e-3)


def test_simulator_is_deterministic_with_a_seed(template):
    image, brain = _brain(template)
    a = simulate_mass(image, brain, (2.0, 2.0, 2.0), np.random.default_rng(11))
    b = simulate_mass(image, brain, (2.0, 2.0, 2.0), np.random.default_rng(11))
    c = simulate_mass(image, brain, (2.0, 2.0, 2.0), np.random.default_rng(12))
    np.testing.assert_array_equal(a.image, b.image)
    assert a.centre_zyx != c.centre_zyx or not np.array_equal(a.mask, c.mask)


def test_coarse_noise_is_smooth():
    noise = coarse_noise((4, 1, 112, 96), 16, 0.2, torch.Generator().manual_seed(0))
    assert noise.shape == (4, 1, 112, 96)
    neighbour_difference = (noise[..., 1:] - noise[..., :-1]).abs().mean()
    assert neighbour_difference < 0.35 * noise.abs().mean()  # white noise: about 1.1


def test_short_training_lowers_the_loss_and_writes_a_loadable_package(trained_dae_run, template):
    package, losses = trained_dae_run
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])
    reloaded = load_package(package.path)
    card = json.loads((package.path / "model.json").read_text())
    assert card["family"] == "dae" and card["training"]["steps"] == 60
    assert reloaded.calibration.threshold_for_fpr(0.01) > 0
    # Sixty steps do not make a denoiser yet, but the trained weights must reconstruct a healthy
    # brain far better than the same network untrained (the weights really were learned and saved).
    prepared = prepare_model_input(template.image, template, identity_registration(), card["preprocessing"]["normalisation"])
    clean, brain = prepared.image, prepared.brain_mask
    trained_error = np.abs(reconstruct(reloaded, clean, brain, torch.device("cpu")) - clean)[brain].mean()
    torch.manual_seed(7)
    untrained = build_network(card["network"]).eval()
    with torch.no_grad():
        guess = untrained(torch.from_numpy(clean)[:, None])[:, 0].numpy()
    assert trained_error < 0.5 * np.abs(guess - clean)[brain].mean()


def test_training_resumes_from_its_checkpoint(tmp_path, template_t1_path):
    from NormativeAnomalyLib.training import train_model

    config = micro_training_config("dae-resume", template_t1_path, steps=6, checkpoint=str(tmp_path / "ckpt.pt"),
                                   checkpoint_every=3, out=str(tmp_path / "straight"))
    straight = train_model(config)
    steps_seen: list[int] = []
    partial = dict(config, steps=3, checkpoint=str(tmp_path / "ckpt2.pt"), out=str(tmp_path / "partial"))
    train_model(partial)
    resumed = train_model(dict(config, checkpoint=str(tmp_path / "ckpt2.pt"), out=str(tmp_path / "resumed")),
                        progress=lambda step, loss: steps_seen.append(step))
    assert steps_seen == [4, 5, 6]  # only the missing steps ran
    for key, value in straight.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value)


@pytest.mark.slow
def test_recalibration_on_other_healthy_data_rewrites_only_the_calibration(trained_dae, tmp_path, real_t1_head_path):
    import shutil

    from NormativeAnomalyLib.training.calibration import recalibrate

    folder = tmp_path / "package"
    shutil.copytree(trained_dae.path, folder)
    recalibrate(folder, None, [str(real_t1_head_path)], "one real head (test)")
    after = load_package(folder)
    assert after.card["calibration"]["data"] == "one real head (test)"
    assert after.card["calibration"]["threshold"] != trained_dae.card["calibration"]["threshold"]
    assert {k: v for k, v in after.card.items() if k != "calibration"} == \
        {k: v for k, v in trained_dae.card.items() if k != "calibration"}
    for key, value in trained_dae.state_dict.items():
        torch.testing.assert_close(after.state_dict[key], value)


# --- Patients' scans lend their healthy tissue: the lesion and its margin stay out of the loss ---

@pytest.fixture(scope="module")
def patient_case(template, tmp_path_factory):
    """A folder with one 'patient': the template head with a labelled 8 mm ball (label only:
    what matters is which voxels the loss may use)."""
    folder = tmp_path_factory.mktemp("patients")
    brain = sitk.GetArrayFromImage(template.brain_mask).astype(bool)
    centre = np.array(ndimage.center_of_mass(brain)).round().astype(int) + [0, 0, 12]
    z, y, x = np.indices(brain.shape)
    ball = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) * 4.0 <= 8.0 ** 2
    sitk.WriteImage(template.image, str(folder / "p1_t1.nii.gz"))
    sitk.WriteImage(sitk_from_array(ball.astype(np.uint8), template.image), str(folder / f"p1{LESION_SUFFIX}"))
    return folder, ball


def test_a_patients_lesion_and_its_margin_stay_out_of_the_loss(template, patient_case):
    from NormativeAnomalyLib.training.data import load_lesion_cases
    from NormativeAnomalyLib.training.loop import DEFAULT_NORMALISATION

    folder, ball = patient_case
    config = {"train_cases": {"data": str(folder), "suffix": "_t1.nii.gz", "cases": ["p1"], "repeat": 3}}
    volumes = load_lesion_cases(config, template, DEFAULT_NORMALISATION)
    assert len(volumes) == 3  # listed `repeat` times
    image, brain, in_loss = volumes[0]
    distance = ndimage.distance_transform_edt(~ball, sampling=2.0)
    assert not in_loss[distance <= 8.0].any()  # the lesion and (registration aside) its 10 mm margin
    assert in_loss[distance >= 12.0].all()
    assert brain[ball].all() and image[brain].std() > 0.1


def test_slices_mostly_excluded_from_the_loss_are_dropped_and_the_loss_ignores_them():
    from NormativeAnomalyLib.training.data import draw_batch, training_samples
    from NormativeAnomalyLib.training.objectives import masked_mse

    image = np.random.default_rng(0).random((4, 8, 8)).astype(np.float32)
    brain = np.ones((4, 8, 8), bool)
    brain[0] = False  # no brain: never a sample
    in_loss = np.ones((4, 8, 8), bool)
    in_loss[2, :5] = False  # 5/8 of the slice's brain excluded: dropped
    in_loss[3, :3] = False  # 3/8 excluded: kept, those rows weighted 0
    samples, weights = training_samples([(image, brain, in_loss)], dims=2)
    np.testing.assert_array_equal(samples.float().numpy(), image[[1, 3]].astype(np.float16).astype(np.float32))
    assert weights is not None and not weights[1, :3].any() and weights[1, 3:].all() and weights[0].all()
    assert training_samples([(image, brain)], dims=2)[1] is None  # healthy volumes: every voxel counts

    batch, weight = draw_batch(samples, 5, torch.Generator().manual_seed(0), weights)
    assert batch.shape == weight.shape == (5, 1, 8, 8)
    wrong_where_excluded = batch + (1 - weight) * 3.0
    assert masked_mse(wrong_where_excluded, batch, weight) == 0
    assert masked_mse(batch + weight * 0.1, batch, weight) == pytest.approx(0.01, rel=1e-4)


@pytest.mark.slow
def test_fine_tuning_on_patients_starts_from_the_package_and_the_card_names_the_cases(trained_dae, patient_case,
                                                                                       template_t1_path, tmp_path):
    from NormativeAnomalyLib.training import train_model

    folder, _ = patient_case
    config = micro_training_config("dae-patients", template_t1_path, steps=0, out=str(tmp_path / "tuned"),
                                   network=trained_dae.card["network"], initialise_from=str(trained_dae.path),
                                   train_volumes=[],
                                   train_cases={"data": str(folder), "suffix": "_t1.nii.gz", "cases": ["p1"]})
    tuned = train_model(config)
    assert tuned.card["training"]["cases"] == ["p1"]
    assert tuned.card["training"]["initialised_from"]["sha256"] == trained_dae.card["weights"]["sha256"]
    for key, value in trained_dae.state_dict.items():  # no step taken: the starting weights
        torch.testing.assert_close(tuned.state_dict[key], value)
    with pytest.raises(ValueError, match="network differs"):
        train_model(dict(config, network=micro_training_config("x", template_t1_path)["network"],
                         out=str(tmp_path / "other")))


def test_every_shipped_training_config_loads_and_builds_its_network():
    from NormativeAnomalyLib.models.networks import build_network
    from NormativeAnomalyLib.training import FAMILIES
    from NormativeAnomalyLib.training.config import load_config

    folder = Path(__file__).resolve().parents[2] / "scripts" / "configs"
    paths = sorted(folder.glob("*.json"))
    assert {p.stem for p in paths} >= {"dae_t1", "dae_t2", "dae_flair", "dae_t1_gpu", "dae_t2_gpu", "dae_flair_gpu"}
    for path in paths:
        config = load_config(path)
        assert config.get("family", "dae") in FAMILIES and "extends" not in config, path.name
        with torch.device("meta"):
            build_network(config["network"])
        assert all(Path(config[key]).is_absolute() for key in ("out", "checkpoint") if key in config)
        if path.stem.endswith("_gpu"):  # varies its CPU config: same model, on a GPU, its own outputs
            cpu = load_config(folder / f"{path.stem[:-4]}.json")
            assert config["device"] == "cuda" and config["name"] == cpu["name"]
            assert config.get("train_cases") == cpu.get("train_cases") and config["checkpoint"] != cpu["checkpoint"]


def test_a_gpu_config_on_a_machine_without_one_says_so(template_t1_path, tmp_path, monkeypatch):
    from NormativeAnomalyLib.training import train_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="asks for a GPU"):
        train_model(micro_training_config("dae-gpu", template_t1_path, steps=1, device="cuda",
                                          out=str(tmp_path / "gpu")))
