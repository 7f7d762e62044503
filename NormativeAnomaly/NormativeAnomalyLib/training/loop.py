"""The training run: config -> trained, calibrated model package.

Config-driven (a plain dict, usually a JSON file under ``scripts/configs/``), seeded, with
resumable checkpoints (every network and optimiser of the family, the batch generator, the
loss curve). Launched with ``torchrun --nproc_per_node N`` the same code trains with
DistributedDataParallel (gloo on CPU, NCCL on GPU): each process draws its own batches,
gradients are averaged, and process 0 writes checkpoints and the package.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from ..models.package import ModelPackage, write_package
from ..templates import Template, load_template
from .calibration import calibrate
from .data import draw_batch, load_healthy, load_lesion_cases, training_preprocessing, training_samples
from .objectives import Objective, objective_for

DEFAULT_SCORING = {"residual": "absolute", "mask_erosion_mm": 2.0, "median_filter_voxels": 3,
                   "min_lesion_mm3": 50.0, "default_fpr": 0.01}
DEFAULT_NORMALISATION = {"method": "percentile", "lower": 1.0, "upper": 99.0, "clip": [0.0, 1.5]}


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device(config: dict[str, Any], rank: int) -> torch.device:
    requested = config.get("device", "cpu")
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("the config asks for a GPU (\"device\": \"cuda\") and torch sees none; "
                             "use the CPU config (without _gpu)")
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(requested)


def _save_checkpoint(path: Path, objective: Objective, step: int, generator: torch.Generator,
                     losses: list[float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    torch.save({"networks": {k: v.state_dict() for k, v in objective.networks.items()},
                "optimisers": {k: v.state_dict() for k, v in objective.optimisers.items()},
                "step": step, "generator": generator.get_state(), "losses": torch.tensor(losses)}, temporary)
    os.replace(temporary, path)  # a crash while saving keeps the previous checkpoint


def _load_checkpoint(path: Path, objective: Objective, device: torch.device) -> dict[str, Any]:
    state = torch.load(path, map_location=device, weights_only=True)  # our own file, tensors only
    if "network" in state:  # written before the families: one network, one optimiser
        state = {**state, "networks": {"model": state["network"]}, "optimisers": {"model": state["optimiser"]}}
    for name, network in objective.networks.items():
        network.load_state_dict(state["networks"][name])
    for name, optimiser in objective.optimisers.items():
        optimiser.load_state_dict(state["optimisers"][name])
    return state


def _initialise(objective: Objective, model: str) -> dict[str, str]:
    """Start from a package's weights (same network): fine-tuning. Returns what the card records."""
    from ..models import resolve_model

    package = resolve_model(model)
    if package.card["network"] != objective.config["network"]:
        raise ValueError(f"initialise_from: {package.name}'s network differs from the config's")
    objective.packaged.load_state_dict(package.state_dict)
    return {"model": package.name, "sha256": package.card["weights"]["sha256"]}


def train_model(config: dict[str, Any], progress: Callable[[int, float], None] | None = None) -> ModelPackage | None:
    """Train, calibrate and write a package as ``config`` says; returns the loaded package
    (``None`` on processes other than 0 of a distributed run)."""
    rank, world = _distributed()
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)  # identical initial weights on every process
    generator = torch.Generator().manual_seed(seed + 7919 * rank)  # but different batches
    device = _device(config, rank)
    template = load_template(config["template"])
    normalisation = config.get("normalisation", DEFAULT_NORMALISATION)
    dims = int(config.get("dims", 2))
    volumes = load_lesion_cases(config, template, normalisation)
    if config.get("train_volumes") or config.get("train_population") or not volumes:
        volumes = load_healthy(config, "train", template, normalisation) + volumes
    samples, weights = training_samples(volumes, dims)

    def wrap(network: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.parallel.DistributedDataParallel(network) if world > 1 else network

    objective = objective_for(config, device, wrap)
    if config.get("initialise_from"):
        start_from = _initialise(objective, config["initialise_from"])
    steps, batch_size = int(config["steps"]), int(config.get("batch_size", 16))
    checkpoint = Path(config["checkpoint"]) if config.get("checkpoint") else None
    start, losses = 0, []
    if checkpoint is not None and checkpoint.is_file():
        state = _load_checkpoint(checkpoint, objective, device)
        start, losses = int(state["step"]), [float(x) for x in state["losses"]]
        if world == 1:
            generator.set_state(state["generator"])  # exact resume; processes > 1 draw fresh batches
        else:
            generator.manual_seed(seed + 7919 * rank + start)
    began = time.perf_counter()
    for network in objective.networks.values():
        network.train()
    for step in range(start, steps):
        batch, weight = draw_batch(samples, batch_size, generator, weights)
        losses.append(objective.step(batch, generator, weight))
        if progress is not None and rank == 0:
            progress(step + 1, losses[-1])
        last = step + 1 == steps
        if checkpoint is not None and rank == 0 and ((step + 1) % int(config.get("checkpoint_every", 200)) == 0 or last):
            _save_checkpoint(checkpoint, objective, step + 1, generator, losses)
    seconds = time.perf_counter() - began
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    objective.packaged.eval()
    card = _card(config, objective, template, normalisation, losses, seconds, world)
    if config.get("initialise_from"):
        card["training"]["initialised_from"] = start_from
    state_dict = {key: value.cpu() for key, value in objective.packaged.state_dict().items()}
    # Write uncalibrated first (a valid package), then calibrate with the very inference code users run.
    out = Path(config["out"])
    package = write_package(out, card, state_dict, overwrite=bool(config.get("overwrite", False)))
    healthy = load_healthy(config, "calibration", template, normalisation)
    if config.get("calibration_limit"):  # slow models (diffusion): the first N calibration volumes
        healthy = healthy[:int(config["calibration_limit"])]
    calibration = calibrate(package, healthy, device)
    card["calibration"].update(fpr=list(calibration.fpr), threshold=list(calibration.threshold))
    (out / "losses.json").write_text(json.dumps(losses))
    plot_losses(losses, out / "training_loss.png", config["name"])
    return write_package(out, card, state_dict, overwrite=True)


def plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogy(losses, color="0.7", linewidth=0.6, label="per step")
    window = max(1, len(losses) // 50)
    if len(losses) >= window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.semilogy(np.arange(window - 1, len(losses)), smooth, color="C0", label=f"mean of {window}")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.set_title(title), ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _card(config: dict[str, Any], objective: Objective, template: Template, normalisation: dict,
          losses: list[float], seconds: float, processes: int = 1) -> dict[str, Any]:
    size = list(template.image.GetSize())
    spacing = [round(s, 6) for s in template.image.GetSpacing()]
    return {
        "format_version": 1, "name": config["name"], "version": config.get("version", "0.1.0"),
        "family": objective.family,
        "description": config.get("description", f"{objective.family.upper()} normative model."),
        "modality": config.get("modality", "T1"), "dims": int(config.get("dims", 2)),
        "template": {"name": template.name}, "grid": {"size": size, "spacing": spacing},
        "preprocessing": training_preprocessing(config, normalisation),
        "network": config["network"], "weights": None,
        "inference": {"batch_size": int(config.get("inference_batch_size", 16)), **objective.inference_settings()},
        "scoring": config.get("scoring", DEFAULT_SCORING),
        "calibration": {"data": config.get("calibration_data") or _describe(config, "calibration"),
                        "fpr": [0.01, 0.5], "threshold": [1.0, 0.0]},
        "training": {"data": config.get("training_data") or _describe(config, "train"),
                     "steps": int(config["steps"]), "batch_size": int(config.get("batch_size", 16)),
                     "learning_rate": float(config.get("learning_rate", 1e-3)), **objective.card_settings(),
                     "seed": int(config.get("seed", 0)), "seconds": round(seconds, 1), "processes": processes,
                     "final_loss": round(float(np.mean(losses[-20:])), 6) if losses else None,
                     "device": _device_name(config), "script": "scripts/train.py",
                     **({"cases": list(config["train_cases"]["cases"])} if config.get("train_cases") else {})},
        "license": config.get("license", "See the licences of the training data."),
    }


def _device_name(config: dict[str, Any]) -> str:
    if config.get("device") == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'' if threads == 1 else 's'}"


def _describe(config: dict[str, Any], split: str) -> str:
    parts = [str(p) for p in config.get(f"{split}_volumes", [])]
    if config.get(f"{split}_population"):
        parts.append(f"population {config[f'{split}_population']}")
    return ", ".join(parts)
