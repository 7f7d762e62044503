"""The model list and the model card summary shown under the model selector.

The list comes from ``NormativeAnomalyLib.models.model_summaries``, which reads the cards as
plain JSON: it works in Slicer's process before torch, MONAI or jsonschema are installed.
"""

from __future__ import annotations

import html
import logging
from typing import Any

from NormativeAnomalyLib.errors import NormativeAnomalyError, one_line
from NormativeAnomalyLib.models import model_summaries

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4, or MRML without the application
    _ = str


def availableModels() -> tuple[list[dict[str, Any]], str]:
    """Registered models, the default first, and "" (or, when there is no usable registry, no
    models and the one-line reason, for the panel's status: the rest of the panel still works).
    A model whose card cannot be read is still listed (by name), so it can be chosen and the
    command-line tool says what is wrong with it."""
    try:
        models = model_summaries()
    except (NormativeAnomalyError, OSError, ValueError) as error:
        message = one_line(error)
        logging.error(f"NormativeAnomaly: cannot list the models: {message}")
        return [], message
    for model in models:
        if "error" in model:
            logging.warning(f"NormativeAnomaly: {model['error']}")
    return models, ""


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
