"""The bundled model registry (``Resources/Models/registry.json``) and name resolution.

``resolve_model`` accepts a registered name, the name of a package installed in the user's
models folder (``resources.user_models_dir``, see ``archive.install_package``), or the path
of a package folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ModelPackageError
from ..resources import models_dir, user_models_dir
from .package import CARD_FILE, ModelPackage, load_package

REGISTRY_FILE = "registry.json"
DIFFUSION_FAMILY = "ddpm"
# What a panel shows for a diffusion model whose card lacks a setting (the schema requires them all).
DIFFUSION_FALLBACK = {"noise_level": 250, "steps": 10, "samples": 1, "noise": "coarse"}


def _registry(root: Path | None = None) -> dict[str, Any]:
    path = (root or models_dir()) / REGISTRY_FILE
    if not path.is_file():
        raise ModelPackageError(f"model registry not found: {path}")
    return json.loads(path.read_text())


def available_models(root: Path | None = None) -> list[dict[str, Any]]:
    """Registered packages as ``{"name", "path", "default"}`` entries (cards not loaded)."""
    root = root or models_dir()
    registry = _registry(root)
    return [
        {"name": entry["name"], "path": root / entry["folder"], "default": entry["name"] == registry["default"]}
        for entry in registry["packages"]
    ]


SUMMARY_FIELDS = ("version", "family", "modality", "dims", "description", "license")


def model_summaries(root: Path | None = None, user_root: Path | None = None) -> list[dict[str, Any]]:
    """What a model selector shows: ``available_models`` entries, then the packages installed in
    the user's models folder (``installed``: True), plus the card's summary fields, the default
    first. Cards are read as plain JSON, not validated (loading the package does that), so
    listing needs neither torch nor jsonschema; an unreadable card gives ``error``."""
    entries = [dict(entry, installed=False) for entry in available_models(root)]
    user_root = user_root or user_models_dir()
    entries += [{"name": name, "path": user_root / name, "default": False, "installed": True}
                for name in installed_model_names(user_root)]
    summaries = []
    for entry in entries:
        summary = dict(entry)
        try:
            card = json.loads((entry["path"] / CARD_FILE).read_text(encoding="utf-8"))
            summary.update({key: card.get(key, "") for key in SUMMARY_FIELDS})
            summary["training_data"] = (card.get("training") or {}).get("data", "")
            summary["template"] = (card.get("template") or {}).get("name", "")
        except (OSError, ValueError, AttributeError) as error:
            summary["error"] = f"cannot read the card of {entry['name']!r}: {error}"
        summaries.append(summary)
    return sorted(summaries, key=lambda summary: not summary["default"])


def default_model_name(root: Path | None = None) -> str:
    return _registry(root)["default"]


def installed_model_names(user_root: Path | None = None) -> list[str]:
    """Names of the packages in the user's models folder: its sub-folders holding a card
    (install_package names each folder after its card's ``name``)."""
    root = user_root or user_models_dir()
    if not root.is_dir():
        return []
    return sorted(folder.name for folder in root.iterdir()
                  if not folder.name.startswith(".") and (folder / CARD_FILE).is_file())


def resolve_model(name_or_path: str | None = None, root: Path | None = None,
                  user_root: Path | None = None) -> ModelPackage:
    """Load a package: a folder by path, else a registered name (the default when ``None``),
    else the name of an installed package."""
    if name_or_path is None:
        name_or_path = default_model_name(root)
    candidate = Path(name_or_path).expanduser()
    if (candidate / CARD_FILE).is_file():
        return load_package(candidate)
    for entry in available_models(root):
        if entry["name"] == name_or_path:
            return load_package(entry["path"])
    installed = installed_model_names(user_root)
    if name_or_path in installed:
        return load_package((user_root or user_models_dir()) / name_or_path)
    names = ", ".join([entry["name"] for entry in available_models(root)] + installed)
    raise ModelPackageError(f"unknown model '{name_or_path}': not a package folder, and not one of: {names}")


def is_diffusion_model(summary: dict[str, Any] | None) -> bool:
    """Whether a model summary is a diffusion model's (whose run takes the diffusion settings)."""
    return bool(summary) and summary.get("family") == DIFFUSION_FAMILY


def card_diffusion_settings(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """A diffusion model's card settings (``inference.diffusion``: noise_level, steps, samples, noise,
    train_timesteps...), with DIFFUSION_FALLBACK for what the card lacks; None for other models.
    Read as plain JSON (no torch), for the Slicer panel and the web app."""
    if not is_diffusion_model(summary):
        return None
    settings = dict(DIFFUSION_FALLBACK)
    try:
        card = json.loads((Path(summary["path"]) / CARD_FILE).read_text(encoding="utf-8"))
        settings.update((card.get("inference") or {}).get("diffusion") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logging.warning(f"cannot read the diffusion settings of {summary.get('name')!r}: {error}")
    return settings
