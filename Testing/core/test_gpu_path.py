"""The GPU path: precision, batch sizing from free memory, out-of-memory fallbacks.

Most of it runs on the CPU: the sizing rule is a function of given numbers, bf16 autocast
exists on the CPU too, and out-of-memory errors are injected by wrapping a really trained
network so its forward raises ``torch.OutOfMemoryError`` (for batches above a size, or on a
stand-in device). The tests marked ``gpu`` need a CUDA or MPS device and are skipped without
one; ``scripts/gpu_check.sh`` runs them on a GPU machine.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from NormativeAnomalyLib.device import (MEMORY_SHARE, batch_size_from_memory, is_out_of_memory, resolve_precision,
                                        select_device)
from NormativeAnomalyLib.errors import NormativeAnomalyError
from NormativeAnomalyLib.inference import run_inference
from NormativeAnomalyLib.model_space import prepare_model_input
from NormativeAnomalyLib.models import resolve_model
from NormativeAnomalyLib.pipeline import RunOptions, detect_anomalies
from NormativeAnomalyLib.progress import Monitor
from NormativeAnomalyLib.registration import identity_registration
from NormativeAnomalyLib.volume_io import read_volume

CUDA = torch.cuda.is_available()
MPS = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
needs_gpu = pytest.mark.skipif(not (CUDA or MPS), reason="needs a CUDA or MPS device")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# Reduced precision against fp32: the anomaly map of the tiny trained DAE on the template (its
# calibration scan), differences in units of the default (1% FPR) threshold, inside the brain.
# Measured on the CPU (torch 2.13, bf16 autocast, 2 cores): max |bf16 - fp32| 0.18 of the
# threshold (one voxel; the 99.9th percentile 0.048, the mean 0.005), 59 of 235,848 brain voxels
# on the other side of the threshold, segmentation Dice 0.986 (2152 vs 2156 voxels, the same 2
# lesions). The difference bounds are about twice that; the Dice bound is 0.95. They stand for
# fp16 and for TF32 too (a GPU's default "fp32" convolutions), which keep more mantissa bits
# (10) than bf16 (7).
MAX_MAP_DIFFERENCE = 0.4  # of the threshold, any voxel
MAX_MAP_DIFFERENCE_999 = 0.1  # of the threshold, 99.9th percentile of brain voxels
MIN_SEGMENTATION_DICE = 0.95


def out_of_memory() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")


class FaultyNetwork(torch.nn.Module):
    """A real network whose forward runs out of memory for batches above ``max_batch`` or on ``failing_device``."""

    def __init__(self, network: torch.nn.Module, max_batch: int | None = None, failing_device: str | None = None):
        super().__init__()
        self.network, self.max_batch, self.failing_device = network, max_batch, failing_device
        self.calls: list[tuple[str, int]] = []

    def forward(self, batch: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append((batch.device.type, batch.shape[0]))
        if (self.max_batch is not None and batch.shape[0] > self.max_batch) or batch.device.type == self.failing_device:
            raise out_of_memory()
        return self.network(batch, **kwargs)


class FaultyPackage:
    """A model package whose networks are built wrapped in :class:`FaultyNetwork`."""

    def __init__(self, package, **fault) -> None:
        self._package, self._fault, self.networks = package, fault, []

    def __getattr__(self, name: str):
        return getattr(self._package, name)

    def build_network(self) -> FaultyNetwork:
        network = FaultyNetwork(self._package.build_network(), **self._fault)
        self.networks.append(network)
        return network


def model_space(package, image: sitk.Image):
    """The model's input (template grid, normalised) for an image already in template space."""
    return prepare_model_input(image, package.template, identity_registration(),
                               package.card["preprocessing"]["normalisation"], None, False)


def assert_maps_agree(result, reference, what: str) -> float:
    """Check ``result``'s anomaly map and segmentation against ``reference``'s within the stated
    bounds; print the figures; return the largest difference (threshold units)."""
    threshold = reference.segmentation.threshold
    a, b = (sitk.GetArrayViewFromImage(r.anomaly_map) for r in (result, reference))
    brain = sitk.GetArrayViewFromImage(reference.brain_mask) > 0
    difference = np.abs(a - b)[brain] / threshold
    ours, theirs = result.segmentation.mask, reference.segmentation.mask
    dice = 2 * np.logical_and(ours, theirs).sum() / max(ours.sum() + theirs.sum(), 1)
    print(f"{what}: max |difference| {difference.max():.4f} of the threshold (99.9th percentile "
          f"{np.percentile(difference, 99.9):.4f}), segmentation Dice {dice:.4f}")
    assert difference.max() <= MAX_MAP_DIFFERENCE
    assert np.percentile(difference, 99.9) <= MAX_MAP_DIFFERENCE_999
    assert dice >= MIN_SEGMENTATION_DICE
    return float(difference.max())


@pytest.fixture(scope="module")
def template_image(template_t1_path) -> sitk.Image:
    return read_volume(template_t1_path)


@pytest.fixture(scope="module")
def fp32_result(trained_dae, template_image):
    return detect_anomalies(template_image, trained_dae, RunOptions(registered=True, device="cpu", precision="fp32"))


# --- Batch sizing and precision rules (numbers given) ----------------------------------------

def test_batch_size_fills_the_memory_share():
    gib = 1 << 30
    # 10 GiB usable, 50 MiB per slice: half of it holds 102 slices; 300 slices are left.
    assert batch_size_from_memory(10 * gib, 50 * (1 << 20), limit=300) == int(10 * gib * MEMORY_SHARE // (50 << 20))
    assert batch_size_from_memory(10 * gib, 50 * (1 << 20), limit=300) == 102


def test_batch_size_is_never_more_than_the_slices_left_nor_less_than_one():
    assert batch_size_from_memory(100 << 30, 1 << 20, limit=80) == 80  # a big card: everything in one batch
    assert batch_size_from_memory(1 << 20, 1 << 30, limit=80) == 1  # not even one slice fits: try 1, then the CPU
    assert batch_size_from_memory(1 << 30, 0, limit=80) == 80  # nothing measured (e.g. all cached): no limit
    assert batch_size_from_memory(1 << 30, 1 << 20, limit=0) == 1


def test_precision_auto_is_fp32_on_the_cpu_and_bad_names_fail_in_one_line():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(NormativeAnomalyError, match="unknown precision 'half'; use one of auto, fp32, bf16, fp16"):
        resolve_precision("half", cpu)


def test_a_bad_precision_fails_before_registration(trained_dae, template_image):
    stages: list[str] = []
    with pytest.raises(NormativeAnomalyError, match="unknown precision"):
        detect_anomalies(template_image, trained_dae, RunOptions(precision="tf32"),
                         Monitor(progress=lambda stage, fraction: stages.append(stage)))
    assert stages == []


def test_only_out_of_memory_errors_count_as_such():
    assert is_out_of_memory(out_of_memory())
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: "
                                         "1.2 MB, max allowed: 18.13 GB). Tried to allocate 1.00 GB on private pool."))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                         "not enough memory: you tried to allocate 1073741824 bytes."))
    assert not is_out_of_memory(RuntimeError("Given groups=1, weight of size [8, 1, 3, 3], expected input to have "
                                             "1 channels, but got 2 channels instead"))
    assert not is_out_of_memory(ValueError("out of memory"))


# --- Out of memory, injected ------------------------------------------------------------------

@pytest.mark.reliability
def test_out_of_memory_halves_the_batch_and_gives_the_same_result(trained_dae, template_image, fp32_result,
                                                                  reliability_case):
    faulty = FaultyPackage(trained_dae, max_batch=5)
    notices: list[str] = []
    result = detect_anomalies(template_image, faulty, RunOptions(registered=True, device="cpu", batch_size=16),
                              Monitor(on_notice=notices.append))
    assert notices == ["CPU out of memory at 16 slices per batch: retrying with 8",
                       "CPU out of memory at 8 slices per batch: retrying with 4"]
    assert result.device_use.notices == notices and result.device_use.batch_size == 4
    assert result.device == "cpu"
    # The same slices, 4 at a time: the same map as a run asked for 4 at a time, bit for bit, and
    # the card's 16 within float rounding (convolution kernels differ by batch size).
    at_four = detect_anomalies(template_image, trained_dae, RunOptions(registered=True, device="cpu", batch_size=4))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(result.anomaly_map),
                                  sitk.GetArrayViewFromImage(at_four.anomaly_map))
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(result.anomaly_map),
                               sitk.GetArrayViewFromImage(fp32_result.anomaly_map), atol=1e-5)
    np.testing.assert_array_equal(result.segmentation.mask, fp32_result.segmentation.mask)
    reliability_case("fault", "GPU out of memory: batch too big (injected; batches above 5 slices fail)",
                     " / ".join(notices) + "; same anomaly map as an un-faulted run")


@pytest.mark.reliability
def test_out_of_memory_at_one_slice_finishes_on_the_cpu(trained_dae, template_image, reliability_case):
    """No GPU here: the 'meta' device stands in for it (the network's pass there always runs out
    of memory), so the real fallback path runs: halve to 1, then rebuild on the CPU and go on."""
    faulty = FaultyPackage(trained_dae, failing_device="meta")
    model_input = model_space(trained_dae, template_image)
    notices: list[str] = []
    result = run_inference(faulty, model_input.image, model_input.brain_mask, torch.device("meta"),
                           Monitor(on_notice=notices.append), batch_size=4)
    assert notices == ["meta out of memory at 4 slices per batch: retrying with 2",
                       "meta out of memory at 2 slices per batch: retrying with 1",
                       "meta out of memory even at 1 slice per batch: finishing on the CPU (fp32)"]
    assert result.use.device == "cpu" and result.use.precision == "fp32" and result.use.notices == notices
    assert [device for device, _ in faulty.networks[-1].calls] == ["cpu"] * len(faulty.networks[-1].calls)
    unfaulted = run_inference(trained_dae, model_input.image, model_input.brain_mask, torch.device("cpu"),
                              batch_size=4)
    np.testing.assert_array_equal(result.reconstruction, unfaulted.reconstruction)
    reliability_case("fault", "GPU out of memory even one slice at a time (injected; a stand-in device)",
                     notices[-1] + "; the run goes on and run.json's device says cpu")


@pytest.mark.reliability
def test_a_3d_model_out_of_memory_finishes_on_the_cpu(template_image, reliability_case):
    package = resolve_model("ae3d-t1")
    faulty = FaultyPackage(package, failing_device="meta")
    model_input = model_space(package, template_image)
    notices: list[str] = []
    result = run_inference(faulty, model_input.image, model_input.brain_mask, torch.device("meta"),
                           Monitor(on_notice=notices.append))
    assert notices == ["meta out of memory even at the whole volume (a 3D model): finishing on the CPU (fp32)"]
    unfaulted = run_inference(package, model_input.image, model_input.brain_mask, torch.device("cpu"))
    np.testing.assert_array_equal(result.reconstruction, unfaulted.reconstruction)
    assert result.use.device == "cpu"
    reliability_case("fault", "GPU out of memory with a 3D model (injected; a stand-in device)", notices[0])


@pytest.mark.reliability
def test_out_of_memory_on_the_cpu_at_one_slice_is_a_one_line_error(trained_dae, template_image, reliability_case):
    faulty = FaultyPackage(trained_dae, failing_device="cpu")
    with pytest.raises(NormativeAnomalyError) as error:
        detect_anomalies(template_image, faulty, RunOptions(registered=True, device="cpu", batch_size=2),
                         Monitor(on_notice=lambda message: None))
    assert str(error.value) == ("out of memory on the CPU even at 1 slice per batch; close other programs and "
                                "run again")
    reliability_case("fault", "out of memory on the CPU even one slice at a time (injected)", str(error.value))


def test_a_diffusion_batch_retried_draws_the_same_noise(template_image):
    """The seeded generator is rewound before a retry: the reconstruction and its variance equal
    an un-faulted run's at the batch size the retry settled on. Two brain slices and a
    one-step x0 prediction keep the shipped diffusion model quick."""
    package = resolve_model("ddpm-t1")
    model_input = model_space(package, template_image)
    brain = np.zeros_like(model_input.brain_mask)
    middle = brain.shape[0] // 2
    brain[middle:middle + 2] = model_input.brain_mask[middle:middle + 2]
    settings = {"steps": 1, "samples": 2}
    faulty = FaultyPackage(package, max_batch=1)
    result = run_inference(faulty, model_input.image, brain, torch.device("cpu"),
                           Monitor(on_notice=lambda message: None), batch_size=2, diffusion=settings)
    unfaulted = run_inference(package, model_input.image, brain, torch.device("cpu"), batch_size=1,
                              diffusion=settings)
    assert result.use.notices == ["CPU out of memory at 2 slices per batch: retrying with 1"]
    np.testing.assert_array_equal(result.reconstruction, unfaulted.reconstruction)
    np.testing.assert_array_equal(result.variance, unfaulted.variance)


def test_notices_without_a_callback_are_logged(trained_dae, template_image, caplog):
    faulty = FaultyPackage(trained_dae, max_batch=8)
    with caplog.at_level("WARNING", logger="NormativeAnomaly"):
        detect_anomalies(template_image, faulty, RunOptions(registered=True, device="cpu", batch_size=16))
    assert [record.getMessage() for record in caplog.records] == [
        "CPU out of memory at 16 slices per batch: retrying with 8"]


# --- Mixed precision on the CPU ---------------------------------------------------------------

def test_bf16_gives_the_fp32_anomaly_map_within_tolerance(trained_dae, template_image, fp32_result):
    bf16 = detect_anomalies(template_image, trained_dae, RunOptions(registered=True, device="cpu", precision="bf16"))
    assert bf16.device_use.precision == "bf16" and fp32_result.device_use.precision == "fp32"
    assert assert_maps_agree(bf16, fp32_result, "bf16 vs fp32 (CPU)") > 0  # > 0: bf16 really ran


# --- On a GPU (skipped without one; scripts/gpu_check.sh) ----------------------------------------

@pytest.mark.gpu
@needs_gpu
def test_gpu_autocast_and_fp32_agree_with_the_cpu(trained_dae, template_image, fp32_result):
    gpu = select_device("auto")
    on_gpu = {precision: detect_anomalies(template_image, trained_dae,
                                          RunOptions(registered=True, device=gpu.type, precision=precision))
              for precision in ("fp32", "auto")}
    assert on_gpu["auto"].device_use.precision in ("bf16", "fp16")
    for precision, result in on_gpu.items():
        assert result.device == gpu.type and result.device_use.notices == []
        assert_maps_agree(result, fp32_result, f"{gpu.type} {result.device_use.precision} vs CPU fp32")


@pytest.mark.gpu
@needs_cuda
def test_sized_batches_fit_on_the_card(trained_dae, template_image, fp32_result):
    result = detect_anomalies(template_image, trained_dae, RunOptions(registered=True, device="cuda"))
    card_size = trained_dae.card["inference"]["batch_size"]
    print(f"batch size chosen from free memory: {result.device_use.batch_size} (card: {card_size})")
    assert result.device == "cuda" and result.device_use.notices == []
    assert result.device_use.batch_size >= 1
    assert_maps_agree(result, fp32_result, "CUDA, sized batches, vs CPU fp32")


@pytest.mark.gpu
@pytest.mark.reliability
@needs_cuda
def test_a_real_cuda_out_of_memory_falls_back_and_finishes(trained_dae, template_image, fp32_result,
                                                           reliability_case):
    """A real OOM: this process is limited to its current reservation plus 32 MiB and asked for all
    brain slices in one batch (one 8-channel full-resolution activation of its 77 slices is 25 MiB)."""
    device = torch.device("cuda")
    detect_anomalies(template_image, trained_dae, RunOptions(registered=True, device="cuda", batch_size=1))  # warm up
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    allowed = torch.cuda.memory_reserved(device) + (32 << 20)
    notices: list[str] = []
    torch.cuda.set_per_process_memory_fraction(allowed / total, device)
    try:
        result = detect_anomalies(template_image, trained_dae,
                                  RunOptions(registered=True, device="cuda", batch_size=96, precision="fp32"),
                                  Monitor(on_notice=notices.append))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    print("\n".join(notices))
    # The first batch holds all 77 brain slices: it cannot fit, so there is a notice.
    assert notices and re.fullmatch(r"GPU \(CUDA\) out of memory at \d+ slices per batch: retrying with \d+",
                                    notices[0])
    assert result.device_use.notices == notices and result.device == result.device_use.device
    assert_maps_agree(result, fp32_result, f"after the fallbacks ({result.device}) vs CPU fp32")
    reliability_case("fault", "GPU out of memory, real (CUDA, process limited to 32 MiB more)", " / ".join(notices))
