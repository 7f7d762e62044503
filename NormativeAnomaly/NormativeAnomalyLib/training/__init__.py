"""Training normative models on healthy data, and writing their packages.

``data`` (healthy volumes in model space, batches, augmentation), ``objectives`` (what each
family learns: dae, ae, vae, gan, ddpm), ``loop`` (the resumable, torchrun-ready run that
ends in a calibrated package), ``calibration`` (thresholds as healthy false-positive rates).
"""

from .calibration import calibrate
from .data import augment, coarse_noise, load_healthy
from .loop import plot_losses, train_model
from .objectives import FAMILIES

__all__ = ["FAMILIES", "augment", "calibrate", "coarse_noise", "load_healthy", "plot_losses",
           "train_model"]
