"""The model card summary shown under the model selector, and a diffusion model's card settings.

The list comes from ``NormativeAnomalyLib.models.model_summaries``, which reads the cards as
plain JSON: it works in Slicer's process before torch, MONAI or jsonschema are installed.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any, Optional

from NormativeAnomalyLib.models import model_summaries
from NormativeAnomalyLib.models.package import CARD_FILE

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4, or MRML without the application
    _ = str

DIFFUSION_FAMILY = "ddpm"
# What the panel shows for a diffusion model whose card lacks a setting (the schema requires them all).
DIFFUSION_FALLBACK = {"noise_level": 250, "steps": 10, "samples": 1, "noise": "coarse"}


def availableModels() -> list[dict[str, Any]]:
    """Registered models, the default first; a model whose card cannot be read is still listed
    (by name), so it can be chosen and the command-line tool says what is wrong with it."""
    models = model_summaries()
    for model in models:
        if "error" in model:
            logging.warning(f"NormativeAnomaly: {model['error']}")
    return models


def cardHtml(model: dict[str, Any] | None) -> str:
    """The model card summary shown under the model selector (rich text, escaped)."""
    if not model:
        return ""

    def field(key: str) -> str:
        return html.escape(str(model.get(key) or "?"))

    dims = f", {field('dims')}D" if model.get("dims") else ""
    lines = [f"<b>{field('name')}</b> {field('version')}: {field('family')}, {field('modality')}{dims}"]
    if model.get("training_data"):
        lines.append(f"<b>{_('Trained on:')}</b> {field('training_data')}")
    if model.get("license"):
        lines.append(f"<b>{_('Licence:')}</b> {field('license')}")
    if model.get("description"):
        lines.append(f"<i>{field('description')}</i>")
    return "<br>".join(lines)


def isDiffusionModel(model: Optional[dict[str, Any]]) -> bool:
    """Whether a model summary is a diffusion model's (whose run takes the diffusion settings)."""
    return bool(model) and model.get("family") == DIFFUSION_FAMILY


def diffusionSettings(model: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A diffusion model's card settings (``inference.diffusion``: noise_level, steps, samples, noise,
    train_timesteps...), with DIFFUSION_FALLBACK for what the card lacks; None for other models."""
    if not isDiffusionModel(model):
        return None
    settings = dict(DIFFUSION_FALLBACK)
    try:
        card = json.loads((Path(model["path"]) / CARD_FILE).read_text(encoding="utf-8"))
        settings.update((card.get("inference") or {}).get("diffusion") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        logging.warning(f"NormativeAnomaly: cannot read the diffusion settings of {model.get('name')!r}: {error}")
    return settings
