"""Loading and writing model packages: ``model.json`` (the card) + safetensors weights.

Loading validates the card against ``model_card.schema.json``, checks the weights'
SHA-256 before parsing them, and parses them with safetensors, which holds tensors only:
a model file can never run code here. Packages may come from strangers, so every file is
read from inside the package folder only (no symlink out of it), and a network is sized
against its weights before memory is spent on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import ModelPackageError, one_line
from ..normative import NormativeStatistics, read_statistics, write_statistics
from ..scoring import Calibration
from ..templates import Template, load_template, sha256_of

if TYPE_CHECKING:  # torch is imported only to load weights: listing models (Slicer's process) needs none
    import torch

CARD_FILE = "model.json"
NORMATIVE_FILE = "normative.safetensors"
MAX_CARD_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_CARD_DEPTH = 32  # the schema needs 5 levels; deeper JSON only exhausts recursion
# Names Windows keeps for devices, whatever follows a dot: no folder there can have one.
WINDOWS_DEVICE_NAMES = re.compile(r"(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?")


@lru_cache(maxsize=1)
def _card_schema() -> dict[str, Any]:
    return json.loads((Path(__file__).with_name("model_card.schema.json")).read_text())


@lru_cache(maxsize=None)
def _compiled_pattern(pattern: str) -> re.Pattern[str]:
    # The schema's patterns use "$" only as their end anchor.
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


def pattern_matches(pattern: str, text: str) -> bool:
    """Whether ``text`` matches a card schema pattern as JSON Schema means it (ECMA-262), where
    ``$`` is the end of the string: Python's ``$`` also matches before a final newline, which
    would let a name such as "dae-t1\\n" through."""
    return _compiled_pattern(pattern).search(text) is not None


def is_model_name(text: Any) -> bool:
    """Whether ``text`` is a valid model name (the card schema's ``name``, and a folder name on
    every platform): what a package is installed and resolved by, and its folder's name."""
    return (isinstance(text, str) and pattern_matches(_card_schema()["properties"]["name"]["pattern"], text)
            and not WINDOWS_DEVICE_NAMES.fullmatch(text))


@lru_cache(maxsize=1)
def _card_validator() -> Any:
    import jsonschema  # here, not at module level: Slicer's process lists models without it

    def pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
        if validator.is_type(instance, "string") and not pattern_matches(pattern, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")

    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": pattern})
    return strict(_card_schema())


@dataclass(frozen=True)
class ModelPackage:
    path: Path
    card: dict[str, Any]
    template: Template
    state_dict: dict[str, torch.Tensor] | None
    # Location-aware scoring (scoring.normative in the card), or None
    normative: NormativeStatistics | None = None

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

    def with_diffusion(self, **settings: Any) -> "ModelPackage":
        """This package with card-only diffusion settings changed (seed, harmonise, patch_grid), for
        measuring a variant; the package on disk is untouched and a run cannot override these."""
        inference = self.card["inference"]
        diffusion = {**inference["diffusion"], **settings}
        return dataclasses.replace(self, card={**self.card, "inference": {**inference, "diffusion": diffusion}})

    def build_network(self) -> torch.nn.Module | None:
        """The network with its weights, in eval mode (``None`` for the intensity baseline)."""
        if self.card["network"] is None:
            return None
        from .networks import build_network

        self._check_weights_fit()
        network = build_network(self.card["network"])
        try:
            network.load_state_dict(self.state_dict, strict=True)
        except RuntimeError as error:
            first = str(error).splitlines()[0]
            raise ModelPackageError(f"model '{self.name}': weights do not fit its network ({first})") from None
        return network.eval()

    def _check_weights_fit(self) -> None:
        """Build the network on the meta device (no memory) and compare its tensors with the weights,
        so that a card asking for a huge network, or arguments its constructor chokes on, fails
        cleanly before anything is allocated."""
        import torch

        from .networks import build_network

        try:
            with torch.device("meta"):
                skeleton = build_network(self.card["network"])
            expected = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
        except ModelPackageError as error:  # kept to one line: the constructor's own message may not be
            raise ModelPackageError(one_line(error)) from None
        except Exception as error:  # the arguments are a stranger's data: any constructor failure is the card's fault
            detail = one_line(error)[:200]
            raise ModelPackageError(f"model '{self.name}': its network cannot be built from the card's arguments "
                                    f"({type(error).__name__}: {detail})") from None
        problem = _first_mismatch(expected, {key: tuple(value.shape) for key, value in self.state_dict.items()})
        if problem:
            raise ModelPackageError(f"model '{self.name}': weights do not fit its network ({problem[:300]})")


def _first_mismatch(expected: dict[str, tuple[int, ...]], given: dict[str, tuple[int, ...]]) -> str | None:
    """The first difference between the tensors a network has and those the weights hold, in words."""
    for key in sorted(expected.keys() - given.keys()):
        return f"missing tensor {key}"
    for key in sorted(given.keys() - expected.keys()):
        return f"unexpected tensor {key}"
    for key, shape in expected.items():
        if given[key] != shape:
            return f"{key} has shape {list(given[key])}, the network wants {list(shape)}"
    return None


def validate_card(card: Any, source: str = "card") -> dict[str, Any]:
    """Schema and consistency checks; raises ModelPackageError with the first problem."""
    import jsonschema

    _check_plain_json(card, source)
    # best_match descends into oneOf alternatives, so the message names the offending field.
    error = jsonschema.exceptions.best_match(_card_validator().iter_errors(card))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ModelPackageError(f"{source} is not a valid model card: {where}: {error.message[:200]}")
    if not is_model_name(card["name"]):  # what the schema cannot say
        raise ModelPackageError(f"{source} is not a valid model card: name: {card['name']!r} is a Windows device "
                                "name, which no folder can have there")
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
    if card["scoring"].get("input_weight") and card["scoring"]["residual"] == "absolute":
        raise ModelPackageError(f"{source}: scoring.input_weight needs a positive or negative residual")
    scoring = card["scoring"]
    if (scoring.get("scan_normalisation") == "median" and scoring["residual"] != "absolute"
            and "normative" not in scoring):
        # Most voxels of a one-signed residual are 0: its median is too, and nothing could be divided by it.
        raise ModelPackageError(f"{source}: scoring.scan_normalisation 'median' needs an absolute residual or "
                                "location statistics (scoring.normative)")
    fpr, threshold = card["calibration"]["fpr"], card["calibration"]["threshold"]
    if len(fpr) != len(threshold):
        raise ModelPackageError(f"{source}: calibration fpr and threshold differ in length")
    if any(b <= a for a, b in zip(fpr, fpr[1:])) or any(b > a for a, b in zip(threshold, threshold[1:])):
        raise ModelPackageError(f"{source}: calibration must have rising fpr and non-rising thresholds")
    return card


def _check_plain_json(value: Any, source: str) -> None:
    """Refuse what JSON schema checks let through: NaN and infinities (Python's json reads them;
    ``minimum`` comparisons with NaN are all false, so a NaN threshold would pass), and nesting
    deep enough to exhaust recursion in the validator. Iterative, so it cannot overflow itself."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_CARD_DEPTH:
            raise ModelPackageError(f"{source}: nested more than {MAX_CARD_DEPTH} levels deep; not a model card")
        if isinstance(item, float) and not math.isfinite(item):
            raise ModelPackageError(f"{source}: holds {item}, which is not a finite number")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((child, depth + 1) for child in item)


def _package_file(package: Path, name: str) -> Path:
    """``package / name``, refused if it resolves outside the package folder (a symlink out of it):
    a stranger's package must not make us read, or hash-compare, any other file of the user."""
    path = package / name
    if path.is_symlink() and not path.resolve().is_relative_to(package.resolve()):
        raise ModelPackageError(f"{path} is a link to a file outside its package folder; refusing it")
    return path


def read_card(path: str | os.PathLike) -> dict[str, Any]:
    """A package's validated card, without loading its weights (and without torch)."""
    path = Path(path)
    card_path = _package_file(path, CARD_FILE)
    if not card_path.is_file():
        raise ModelPackageError(f"{path} is not a model package (no {CARD_FILE})")
    with open(card_path, "rb") as stream:
        text = stream.read(MAX_CARD_BYTES + 1)  # bounded, even if the file grows after a size check
    if len(text) > MAX_CARD_BYTES:
        raise ModelPackageError(f"{card_path} is too large to be a model card")
    try:
        card = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(f"{card_path} is not valid JSON: {error}") from None
    except RecursionError:
        raise ModelPackageError(f"{card_path}: nested too deeply; not a model card") from None
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
    normative = None
    if "normative" in card["scoring"]:
        entry = card["scoring"]["normative"]
        shape = tuple(reversed(grid["size"]))  # (z, y, x), as model-space arrays are
        normative = read_statistics(_package_file(path, entry["file"]), entry["sha256"], shape, card["name"])
    return ModelPackage(path=path, card=card, template=template, state_dict=state_dict, normative=normative)


def _load_weights(package: Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    weights_path = _package_file(package, card["weights"]["file"])  # the schema allows a bare file name only
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
                  *, overwrite: bool = False, normative: NormativeStatistics | None = None) -> ModelPackage:
    """Write card (+ weights, + normative statistics) to a package folder and load it back to prove it is valid.

    With ``normative``, the card's ``scoring.normative`` entry (its ``data`` at least) gets the file and hash."""
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
    if normative is not None:
        write_statistics(path / NORMATIVE_FILE, normative)
        card["scoring"] = {**card["scoring"], "normative": {**card["scoring"]["normative"], "file": NORMATIVE_FILE,
                                                           "sha256": sha256_of(path / NORMATIVE_FILE)}}
    validate_card(card, f"card for {path}")
    (path / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return load_package(path)
