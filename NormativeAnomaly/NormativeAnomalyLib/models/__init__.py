"""Model packages: a JSON card plus safetensors weights, loaded without unpickling."""

from .package import ModelPackage, load_package, read_card, write_package
from .registry import available_models, default_model_name, model_summaries, resolve_model

__all__ = ["ModelPackage", "load_package", "read_card", "write_package", "available_models", "default_model_name", "model_summaries",
           "resolve_model"]
