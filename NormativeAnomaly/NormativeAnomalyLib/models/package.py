"""Loading and writing model packages: ``model.json`` (the card) + safetensors weights.

Loading validates the card against ``model_card.schema.json``, checks the weights'
SHA-256 before parsing them, and parses them with safetensors, which holds tensors only:
a model file can never run code here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelPackageError
from ..scoring import Calibration
from ..templates import Template, load_template, sha256_of

if TYPE_CHECKING:  # torch is imported only to load weights: listing models (Slicer's process) needs none
    import torch

CARD_FILE = "model.json"
MAX_CARD_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30


@lru_cache(maxsize=1)
def _card_schema() -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("model_card.schema.json")).read_text())


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    card: dict[str, Any]
    template: Template
    state_dict: dict[str, torch.Tensor] | None

    @property
    def name(self) -> str:
        return self.card["name"]

    @property
    def family(self) -> str:
        return self.card["family"]

    @property
    def calibration(self) -> Calibration:
        calibration = self.card["calibration"]
        return Calibration(fpr=tuple(calibration["fpr"]), threshold=tuple(calibration["threshold"]))

    def build_network(self) -> torch.nn.Module | None:
        """The network with its weights, in eval mode (``None`` for the intensity baseline)."""
        if self.card["network"] is None:
            return None
        from .networks import build_network

        network = build_network(self.card["network"])
        try:
            network.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise ModelPackageError(f"model '{self.name}': weights do not fit its network ({first})") from None
        return network.eval()


def validate_card(card: Any, source: str = "card") -> dict[str, Any]:
    """Schema and consistency checks; raises ModelPackageError with the first problem."""
    import jsonschema  # here, not at module level: Slicer's process lists models without it

    validator = jsonschema.Draft202012Validator(_card_schema())
    # best_match descends into oneOf alternatives, so the message names the offending field.
    error = jsonschema.exceptions.best_match(validator.iter_errors(card))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ModelPackageError(f"{source} is not a valid model card: {where}: {error.message[:200]}")
    if (card["network"] is None) != (card["family"] == "intensity") or (card["network"] is None) != (
        card["weights"] is None
    ):
        raise ModelPackageError(f"{source}: only the 'intensity' family has no network and no weights")
    is_diffusion = card["family"] == "ddpm"
    if is_diffusion != ("diffusion" in card["inference"]) or (
            is_diffusion and card["network"]["name"] != "DiffusionModelUNet"):
        raise ModelPackageError(f"{source}: the 'ddpm' family, and only it, has a DiffusionModelUNet and "
                                "inference.diffusion settings")
    if is_diffusion and card["inference"]["diffusion"]["noise_level"] > card["inference"]["diffusion"]["train_timesteps"]:
        raise ModelPackageError(f"{source}: inference.diffusion.noise_level exceeds train_timesteps")
    fpr, threshold = card["calibration"]["fpr"], card["calibration"]["threshold"]
    if len(fpr) != len(threshold):
        raise ModelPackageError(f"{source}: calibration fpr and threshold differ in length")
    if any(b <= a for a, b in zip(fpr, fpr[1:])) or any(b > a for a, b in zip(threshold, threshold[1:])):
        raise ModelPackageError(f"{source}: calibration must have rising fpr and non-rising thresholds")
    return card


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """A package's validated card, without loading its weights (and without torch)."""
    path = Path(path)
    card_path = path / CARD_FILE
    if not card_path.is_file():
        raise ModelPackageError(f"{path} is not a model package (no {CARD_FILE})")
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise ModelPackageError(f"{card_path} is too large to be a model card")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(f"{card_path} is not valid JSON: {error}") from None
    return validate_card(card, str(card_path))


def load_package(path: str | os.PathLike) -> ModelPackage:
    path = Path(path)
    card = read_card(path)
    template = load_template(card["template"]["name"])
    grid = card["grid"]
    if list(template.image.GetSize()) != grid["size"] or any(
        abs(a - b) > 1e-3 for a, b in zip(template.image.GetSpacing(), grid["spacing"])
    ):
        raise ModelPackageError(f"model '{card['name']}': its grid does not match template '{template.name}'")
    state_dict = _load_weights(path, card) if card["weights"] else None
    return ModelPackage(path=path, card=card, template=template, state_dict=state_dict)


def _load_weights(package: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights_path = package / card["weights"]["file"]  # the schema allows a bare file name only
    if not weights_path.is_file():
        raise ModelPackageError(f"model '{card['name']}': weights file {weights_path.name} is missing")
    if weights_path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ModelPackageError(f"model '{card['name']}': weights file is larger than {MAX_WEIGHTS_BYTES >> 30} GB")
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    blob = weights_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != card["weights"]["sha256"]:
        raise ModelPackageError(
            f"model '{card['name']}': {weights_path.name} does not match the SHA-256 in its card "
            "(corrupted or tampered with); refusing to load it"
        )
    try:
        return load_safetensors(blob)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise ModelPackageError(f"model '{card['name']}': {weights_path.name} is not a safetensors file ({error})") from None


def write_package(path: str | os.PathLike, card: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None,
                  *, overwrite: bool = False) -> ModelPackage:
    """Write card (+ weights) to a package folder and load it back to prove it is valid."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ModelPackageError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    card = dict(card)
    if state_dict is not None:
        from safetensors.torch import save as save_safetensors

        weights_file = "weights.safetensors"
        tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
        (path / weights_file).write_bytes(save_safetensors(tensors))
        card["weights"] = {"file": weights_file, "sha256": sha256_of(path / weights_file)}
    validate_card(card, f"card for {path}")
    (path / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return load_package(path)
