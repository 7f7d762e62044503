"""Training configs: plain JSON files (``scripts/configs/``), paths relative to the file.

A config may extend another (``"extends": "dae_flair.json"``): its keys replace the base's, so a
GPU variant says only what differs (device, steps, batch size, network).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PATH_KEYS = ("out", "checkpoint", "train_population", "calibration_population")
PATH_LIST_KEYS = ("train_volumes", "calibration_volumes")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """The config at ``path`` with its base merged in and every path made absolute."""
    path = Path(path).resolve()
    config = json.loads(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path.name}: a training config is a JSON object")
    base = load_config(path.parent / config.pop("extends")) if config.get("extends") else {}
    folder = path.parent

    def resolve(value: str) -> str:
        return str((folder / value).resolve())

    for key in PATH_LIST_KEYS:
        if key in config:
            config[key] = [resolve(p) for p in config[key]]
    for key in PATH_KEYS:
        if config.get(key):
            config[key] = resolve(config[key])
    if config.get("train_cases"):
        config["train_cases"] = {**config["train_cases"], "data": resolve(config["train_cases"]["data"])}
    return {**base, **config}
