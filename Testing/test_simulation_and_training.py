"""The lesion simulator (exact masks) and a real, short training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from conftest import micro_training_config
from NormativeAnomalyLib.inference import reconstruct
from NormativeAnomalyLib.model_space import prepare_model_input
from NormativeAnomalyLib.models import load_package
from NormativeAnomalyLib.models.networks import build_network
from NormativeAnomalyLib.registration import identity_registration
from NormativeAnomalyLib.simulation import simulate_mass
from NormativeAnomalyLib.training import coarse_noise


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


def test_recalibration_on_other_healthy_data_rewrites_only_the_calibration(trained_dae, tmp_path, real_t1_head_path):
    import shutil
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from calibrate import recalibrate

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
