"""Model packages: a JSON card plus safetensors weights, loaded without unpickling."""

from .archive import install_package
from .package import ModelPackage, is_model_name, load_package, read_card, write_package
from .registry import (available_models, bundled_model_names, default_model_name, installed_model_names,
                       is_package_path, modality_from_name, model_summaries, preselected_model,
                       resolve_model)

__all__ = ["ModelPackage", "load_package", "read_card", "write_package", "available_models", "default_model_name",
           "model_summaries", "resolve_model", "install_package", "installed_model_names", "bundled_model_names",
           "is_model_name", "is_package_path", "modality_from_name", "preselected_model"]
