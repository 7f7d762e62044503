"""Networks named in model cards, built from ``monai.networks.nets``.

Only the classes listed here can be named (the card schema enforces the same list), and
their arguments are plain JSON, so a card cannot import or run arbitrary code.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelPackageError

ALLOWED_NETWORKS = ("UNet", "BasicUNet", "AutoEncoder", "VarAutoEncoder", "DiffusionModelUNet")


def build_network(spec: dict[str, Any]) -> torch.nn.Module:
    name, args = spec["name"], spec["args"]
    if name not in ALLOWED_NETWORKS:
        raise ModelPackageError(f"network '{name}' is not one of {', '.join(ALLOWED_NETWORKS)}")
    from monai.networks import nets  # imported here: MONAI is slow to import and not needed for the baseline

    try:
        return getattr(nets, name)(**args)
    except (TypeError, ValueError, AssertionError) as error:
        raise ModelPackageError(f"network '{name}' cannot be built from the card's arguments: {error}") from None
