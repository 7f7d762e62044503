"""Every model family trains, packages, loads through the same loader and runs end to end.

Tiny networks trained for a few steps on the ICBM template (a real MRI): these tests check
the machinery of each family (objective, card, package, inference path, calibration), not
the quality of the shipped models (that is scripts/evaluate.py's job).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import micro_training_config

from NormativeAnomalyLib.diffusion import settings_with, structured_noise
from NormativeAnomalyLib.options import DIFFUSION_NOISE_KINDS
from NormativeAnomalyLib.errors import NormativeAnomalyError
from NormativeAnomalyLib.models import load_package
from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
from NormativeAnomalyLib.simplex_noise import simplex3d, simplex_noise
from NormativeAnomalyLib.training import train_model

REPO = Path(__file__).resolve().parents[2]
SLICE_SHAPE = [112, 96]  # axial slices of the 2 mm template grid (y, x)

TINY_NETWORKS = {
    "ae": {"network": {"name": "AutoEncoder", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                                                       "channels": [4, 8], "strides": [2, 2]}}},
    "vae": {"network": {"name": "VarAutoEncoder", "args": {"spatial_dims": 2, "in_shape": [1] + SLICE_SHAPE,
                                                           "out_channels": 1, "latent_size": 8,
                                                           "channels": [4, 8], "strides": [2, 2]}},
            "kl_weight": 0.5},
    "gan": {"network": {"name": "AutoEncoder", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1,
                                                        "channels": [4, 8], "strides": [2, 2]}},
            "discriminator": {"spatial_dims": 2, "num_layers_d": 2, "channels": 4, "in_channels": 1,
                              "out_channels": 1},
            "adversarial_weight": 0.05},
    "ddpm": {"network": {"name": "DiffusionModelUNet",
                         "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": 1, "channels": [8, 8],
                                  "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 4}},
             "diffusion": {"train_timesteps": 100, "noise_level": 20, "steps": 2, "samples": 1, "noise": "simplex"}},
}


@pytest.fixture(scope="module")
def family_packages(tmp_path_factory, template_t1_path) -> dict:
    """One tiny trained package per family (2D), plus a 3D autoencoder."""
    root = tmp_path_factory.mktemp("families")
    packages = {}
    for family, settings in TINY_NETWORKS.items():
        config = micro_training_config(f"{family}-test", template_t1_path, family=family, steps=4,
                                       out=str(root / family), **settings)
        packages[family] = train_model(config)
    config_3d = micro_training_config(
        "ae3d-test", template_t1_path, family="ae", dims=3, steps=2, batch_size=1, out=str(root / "ae3d"),
        inference_batch_size=1,
        network={"name": "AutoEncoder", "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 1,
                                                  "channels": [2, 4], "strides": [2, 2]}})
    packages["ae3d"] = train_model(config_3d)
    return packages


@pytest.mark.parametrize("name", ["ae", "vae", "gan", "ddpm", "ae3d"])
@pytest.mark.slow
def test_every_family_packages_loads_and_runs_end_to_end(family_packages, name, template):
    package = family_packages[name]
    reloaded = load_package(package.path)  # the one loader: schema, SHA-256, safetensors, strict state dict
    card = reloaded.card
    assert card["family"] == ("ae" if name == "ae3d" else name)
    assert card["dims"] == (3 if name == "ae3d" else 2)
    assert (package.path / "weights.safetensors").is_file() and (package.path / "training_loss.png").is_file()
    assert len(json.loads((package.path / "losses.json").read_text())) == card["training"]["steps"]
    thresholds = card["calibration"]["threshold"]
    assert thresholds[0] >= thresholds[-1] and thresholds[0] > 0  # calibrated on real anatomy
    if name == "gan":  # only the generator is packaged; the critic stays in training
        assert not any(key.startswith("discriminator") for key in reloaded.state_dict)
        assert card["training"]["discriminator"]["num_layers_d"] == 2
    # The whole pipeline on the template image itself (a real MRI already in template space).
    result = detect_anomalies(template.image, reloaded, RunOptions(registered=True))
    assert result.pseudo_healthy.GetSize() == template.image.GetSize()
    reconstruction = sitk.GetArrayViewFromImage(result.pseudo_healthy)
    assert np.isfinite(reconstruction).all()
    assert not np.array_equal(reconstruction, sitk.GetArrayViewFromImage(template.image))  # the model changed it
    assert result.uncertainty is None  # one reconstruction: no variance


@pytest.mark.slow
def test_diffusion_runs_with_two_steps_and_writes_an_uncertainty_map(family_packages, real_t1_head_path, tmp_path):
    """The CLI on a real head (registration included): 2 DDIM steps, 3 samples -> uncertainty_map
    on the input's grid; the card's settings are overridden from the command line."""
    package = family_packages["ddpm"]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO / "NormativeAnomaly"))
    result = subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", "run", str(real_t1_head_path),
                             "--model", str(package.path), "--out", str(out), "--diffusion-steps", "2",
                             "--noise-level", "30", "--samples", "3", "--quiet"],
                            capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "run.json").read_text())
    assert "uncertainty_map.nii.gz" in summary["outputs"]
    assert summary["settings"]["samples"] == 3 and summary["settings"]["diffusion_steps"] == 2
    head = sitk.ReadImage(str(real_t1_head_path))
    uncertainty = sitk.ReadImage(str(out / "uncertainty_map.nii.gz"))
    assert uncertainty.GetSize() == head.GetSize()
    np.testing.assert_allclose(uncertainty.GetOrigin(), head.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(uncertainty.GetSpacing(), head.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(uncertainty.GetDirection(), head.GetDirection(), atol=1e-6)
    variance = sitk.GetArrayViewFromImage(uncertainty)
    assert variance.min() >= 0 and variance.max() > 0  # three different noise draws disagree somewhere


@pytest.mark.slow
def test_diffusion_reconstruction_is_seeded_and_overrides_are_checked(family_packages, template):
    package = family_packages["ddpm"]
    first = detect_anomalies(template.image, package, RunOptions(registered=True, diffusion={"steps": 1}))
    again = detect_anomalies(template.image, package, RunOptions(registered=True, diffusion={"steps": 1}))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(first.pseudo_healthy),
                                  sitk.GetArrayViewFromImage(again.pseudo_healthy))
    with pytest.raises(NormativeAnomalyError, match="noise level"):
        detect_anomalies(template.image, package, RunOptions(registered=True, diffusion={"noise_level": 10_000}))


@pytest.mark.slow
def test_diffusion_harmonisation_keeps_to_the_input_and_patches_restore_every_tile(family_packages, template):
    """THOR's harmonisation pulls the pseudo-healthy image towards the input; pDDPM's tiles cover the
    slice once each (every voxel restored, none left as the clean context), and both are card switches."""
    package = family_packages["ddpm"]
    x = sitk.GetArrayFromImage(template.image)

    def departure(variant) -> float:
        result = detect_anomalies(template.image, variant, RunOptions(registered=True))
        return float(np.abs(sitk.GetArrayFromImage(result.pseudo_healthy) - x).mean())

    plain = departure(package)
    assert departure(package.with_diffusion(harmonise=0.5)) < 0.8 * plain
    patched = departure(package.with_diffusion(patch_grid=2))
    assert np.isfinite(patched) and patched != plain and patched > 0


def test_diffusion_tiles_cover_the_slice_once():
    from NormativeAnomalyLib.diffusion import _tiles

    for shape, grid in [((2, 1, 112, 96), 2), ((1, 1, 7, 5, 9), 3), ((1, 1, 4, 4), 1)]:
        count = np.zeros(shape)
        for tile in _tiles(shape, grid):
            count[tile] += 1
        assert (count == 1).all() and len(_tiles(shape, grid)) == grid * grid


def test_diffusion_options_are_refused_for_other_families(family_packages, real_t1_head_path, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "NormativeAnomaly"))
    result = subprocess.run([sys.executable, "-m", "NormativeAnomalyLib.cli", "run", str(real_t1_head_path),
                             "--model", str(family_packages["ae"].path), "--out", str(tmp_path / "out"),
                             "--samples", "4"], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("'ae-test' is a ae model")
    assert not (tmp_path / "out").exists()


def test_structured_noise_has_unit_variance_and_is_smooth_unless_gaussian():
    generator = torch.Generator().manual_seed(0)
    for kind in DIFFUSION_NOISE_KINDS:
        noise = structured_noise((4, 1, 112, 96), kind, generator)
        assert noise.shape == (4, 1, 112, 96)
        assert abs(float(noise.std()) - 1.0) < 0.05 and abs(float(noise.mean())) < 0.1
        neighbour = float((noise[..., 1:] - noise[..., :-1]).abs().mean())
        # white noise: about 1.13 (2/sqrt(pi)); simplex and coarse fields change slowly
        assert (neighbour > 1.0) if kind == "gaussian" else (neighbour < 0.4), (kind, neighbour)
    with pytest.raises(ValueError, match="diffusion steps"):
        settings_with({"noise_level": 5}, {"steps": 6})
    with pytest.raises(ValueError, match="unknown diffusion noise"):
        structured_noise((1, 1, 16, 16), "perlin")


def test_simplex_noise_is_bounded_continuous_and_seeded():
    generator = torch.Generator().manual_seed(3)
    permutation = torch.randperm(256, generator=generator)
    points = torch.rand(50_000, 3, generator=generator) * 40
    values = simplex3d(points, permutation)
    assert float(values.abs().max()) <= 1.0 and float(values.std()) > 0.2
    assert float((simplex3d(points + 1e-3, permutation) - values).abs().max()) < 0.05  # no jumps
    assert not torch.equal(values, simplex3d(points, torch.randperm(256, generator=generator)))
    first = simplex_noise((2, 1, 24, 20, 16), torch.Generator().manual_seed(5))
    again = simplex_noise((2, 1, 24, 20, 16), torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and not torch.equal(first[0], first[1])  # seeded; each sample its own
