"""The bundled model registry (``Resources/Models/registry.json``) and name resolution.

``resolve_model`` accepts a model name, bundled or installed in the user's models folder
(``resources.user_models_dir``, see ``archive.install_package``), or the path of a package
folder. Only what looks like a path (``is_package_path``) is looked for on disk: a folder
in the working directory never stands in for a model name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..errors import ModelPackageError
from ..options import DIFFUSION_DEFAULTS
from ..resources import models_dir, user_models_dir
from .package import CARD_FILE, ModelPackage, is_model_name, load_package

REGISTRY_FILE = "registry.json"
DIFFUSION_FAMILY = "ddpm"


def _registry(root: Path | None = None) -> dict[str, Any]:
    path = (root or models_dir()) / REGISTRY_FILE
    if not path.is_file():
        raise ModelPackageError(f"model registry not found: {path}")
    return json.loads(path.read_text())


def available_models(root: Path | None = None) -> list[dict[str, Any]]:
    """Registered packages as ``{"name", "path", "default", "default_for_modality"}`` entries (cards
    not loaded): ``default`` is the model used when none is named, ``default_for_modality`` the one
    preselected for a scan of its contrast (the registry's ``defaults_by_modality``, set from the
    real-lesion evaluation)."""
    root = root or models_dir()
    registry = _registry(root)
    per_modality = set(registry.get("defaults_by_modality", {}).values())
    return [
        {"name": entry["name"], "path": root / entry["folder"], "default": entry["name"] == registry["default"],
         "default_for_modality": entry["name"] in per_modality}
        for entry in registry["packages"]
    ]


# Contrasts as scan names and DICOM series descriptions spell them; the first match wins, so the
# more specific spellings come first (a "T2-FLAIR" is a FLAIR).
MODALITY_WORDS = (
    ("FLAIR", ("flair", "tirm", "dark[ _-]?fluid")),
    ("T2", ("t2w?", "t2[ _-]?weighted", "tse", "frfse")),
    ("T1", ("t1w?", "t1[ _-]?weighted", "mprage", "mp[ _-]?rage", "spgr", "bravo", "tfl3d", "t1ce", "t1c")),
)


def modality_from_name(name: str) -> str | None:
    """The contrast a volume's name or series description states (T1, T2 or FLAIR), if any."""
    import re

    lowered = name.lower()
    for modality, words in MODALITY_WORDS:
        if any(re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9])", lowered) for word in words):
            return modality
    return None


def preselected_model(volume_name: str, summaries: list[dict[str, Any]]) -> tuple[str | None, str]:
    """(the model to preselect for a volume, why): the default model of the contrast its name
    states, else the default model. ``summaries`` as ``model_summaries`` gives them."""
    usable = [s for s in summaries if "error" not in s]
    default = next((s["name"] for s in usable if s.get("default")), usable[0]["name"] if usable else None)
    modality = modality_from_name(volume_name)
    if modality is None:
        return default, f"its name states no contrast (T1, T2, FLAIR): the default model, {default}"
    match = next((s["name"] for s in usable if s.get("modality") == modality and s.get("default_for_modality")),
                 None) or next((s["name"] for s in usable if s.get("modality") == modality), None)
    if match is None:
        return default, f"its name says {modality}, and no {modality} model is installed: the default model, {default}"
    return match, f"its name says {modality}: {match}, the {modality} model the evaluation recommends"


def bundled_model_names(root: Path | None = None) -> set[str]:
    """Names of the bundled models (none where the resources have no registry): they resolve
    before installed ones, so an installed package of the same name would never be used."""
    try:
        return {entry["name"] for entry in available_models(root)}
    except ModelPackageError:
        return set()


def is_package_path(name_or_path: str) -> bool:
    """Whether ``--model`` names a package folder rather than a model: it holds a path separator
    or a drive, or starts with "." or "~" (./dae-t1, ../models/x, ~/x, /x, C:x)."""
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    return any(sep in name_or_path for sep in separators) or name_or_path.startswith((".", "~")) or bool(
        Path(name_or_path).drive)


def _name_mismatch(folder: Path, name: str, card_name: Any) -> str:
    return (f"model {name!r}: its folder {folder} holds the package {card_name!r}; a package is used by its "
            "card's name (install it with 'normative-anomaly models install')")


SUMMARY_FIELDS = ("version", "family", "modality", "dims", "description", "license")


def model_summaries(root: Path | None = None, user_root: Path | None = None) -> list[dict[str, Any]]:
    """What a model selector shows: ``available_models`` entries, then the packages installed in
    the user's models folder (``installed``: True), plus the card's summary fields, the default
    first. Cards are read as plain JSON, not validated (loading the package does that), so
    listing needs neither torch nor jsonschema; an unreadable card gives ``error``."""
    entries = [dict(entry, installed=False) for entry in available_models(root)]
    user_root = user_root or user_models_dir()
    entries += [{"name": name, "path": user_root / name, "default": False, "installed": True}
                for name in installed_model_names(user_root, root)]
    summaries = []
    for entry in entries:
        summary = dict(entry)
        try:
            card = json.loads((entry["path"] / CARD_FILE).read_text(encoding="utf-8"))
            summary.update({key: card.get(key, "") for key in SUMMARY_FIELDS})
            summary["training_data"] = (card.get("training") or {}).get("data", "")
            summary["template"] = (card.get("template") or {}).get("name", "")
            if card.get("name") != entry["name"]:  # resolve_model would refuse it
                summary["error"] = _name_mismatch(entry["path"], entry["name"], card.get("name"))
        except (OSError, ValueError, AttributeError) as error:
            summary["error"] = f"cannot read the card of {entry['name']!r}: {error}"
        summaries.append(summary)
    return sorted(summaries, key=lambda summary: not summary["default"])


def default_model_name(root: Path | None = None) -> str:
    return _registry(root)["default"]


def installed_model_names(user_root: Path | None = None, root: Path | None = None) -> list[str]:
    """Names of the packages in the user's models folder: its sub-folders holding a card, named
    as a model may be (install_package names each folder after its card's ``name``), but for
    those a bundled model's name hides (bundled names resolve first)."""
    user_root = user_root or user_models_dir()
    if not user_root.is_dir():
        return []
    bundled = bundled_model_names(root)
    return sorted(folder.name for folder in user_root.iterdir()
                  if is_model_name(folder.name) and folder.name not in bundled and (folder / CARD_FILE).is_file())


def resolve_model(name_or_path: str | None = None, root: Path | None = None,
                  user_root: Path | None = None) -> ModelPackage:
    """Load a package: a folder when given a path (``is_package_path``), else a bundled model's
    name (the default when ``None``), else an installed package's."""
    if name_or_path is None:
        name_or_path = default_model_name(root)
    if is_package_path(name_or_path):  # absolute, so that run.json says which folder it was
        return load_package(Path(name_or_path).expanduser().absolute())
    for entry in available_models(root):
        if entry["name"] == name_or_path:
            return _load_named(name_or_path, entry["path"])
    installed = installed_model_names(user_root, root)
    if name_or_path in installed:
        return _load_named(name_or_path, (user_root or user_models_dir()) / name_or_path)
    names = ", ".join([entry["name"] for entry in available_models(root)] + installed)
    here = Path(name_or_path, CARD_FILE).is_file()
    hint = f"; for the package folder here, write './{name_or_path}'" if here else ""
    raise ModelPackageError(f"unknown model {name_or_path!r}: not one of: {names}{hint}")


def _load_named(name: str, folder: Path) -> ModelPackage:
    """The package in ``folder``, which must be the one its card calls ``name``."""
    package = load_package(folder)
    if package.name != name:
        raise ModelPackageError(_name_mismatch(folder, name, package.name))
    return package


def is_diffusion_model(summary: dict[str, Any] | None) -> bool:
    """Whether a model summary is a diffusion model's (whose run takes the diffusion settings)."""
    return bool(summary) and summary.get("family") == DIFFUSION_FAMILY


def card_diffusion_settings(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """A diffusion model's card settings (``inference.diffusion``: noise_level, steps, samples, noise,
    train_timesteps...), with DIFFUSION_DEFAULTS for what the card lacks; None for other models.
    Read as plain JSON (no torch), for the Slicer panel and the web app."""
    if not is_diffusion_model(summary):
        return None
    settings = dict(DIFFUSION_DEFAULTS)
    try:
        card = json.loads((Path(summary["path"]) / CARD_FILE).read_text(encoding="utf-8"))
        settings.update((card.get("inference") or {}).get("diffusion") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logging.warning(f"cannot read the diffusion settings of {summary.get('name')!r}: {error}")
    return settings
