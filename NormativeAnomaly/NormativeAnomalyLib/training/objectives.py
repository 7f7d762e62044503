"""What each model family learns from a batch of healthy images.

- ``dae``: remove coarse noise (Kascenas et al. 2022) - a U-Net with skips, the default model.
- ``ae``: reproduce the input through a spatial bottleneck (MONAI ``AutoEncoder``; Baur et al. 2021).
- ``vae``: the same through a dense latent with a KL prior (MONAI ``VarAutoEncoder``).
- ``gan``: an autoencoder trained with an adversarial loss from MONAI's ``PatchDiscriminator``
  (least squares): sharper reconstructions than MSE alone. Chosen over f-AnoGAN because it
  trains in one stage with one reconstruction pass at inference, and f-AnoGAN's three stages
  (WGAN-GP, then an izi_f encoder) do not fit a 2-core CPU budget. Only the generator is packaged.
- ``ddpm``: predict the noise added at a random diffusion step (MONAI ``DiffusionModelUNet`` +
  ``DDPMScheduler``); see ``diffusion.py`` for how it reconstructs.

Each objective holds its networks (``packaged`` is the one written to the package) and
optimisers; ``step`` returns the loss reported in the training curve. ``weight`` (1 where the
loss counts, 0 where it does not: a patient's lesion and its margin) masks every family's
reconstruction or noise-prediction error.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..diffusion import structured_noise, to_diffusion_range
from ..options import DIFFUSION_DEFAULTS
from ..models.networks import build_network
from .data import coarse_noise

FAMILIES = ("dae", "ae", "vae", "gan", "ddpm")
Wrap = Callable[[torch.nn.Module], torch.nn.Module]  # e.g. DistributedDataParallel


class Objective:
    family = ""

    def __init__(self, config: dict[str, Any], device: torch.device, wrap: Wrap) -> None:
        self.config, self.device = config, device
        self.packaged = build_network(config["network"]).to(device)
        self.networks: dict[str, torch.nn.Module] = {"model": self.packaged}
        self.model = wrap(self.packaged)
        learning_rate = float(config.get("learning_rate", 1e-3))
        self.optimisers = {"model": torch.optim.Adam(self.packaged.parameters(), lr=learning_rate)}

    def step(self, clean: torch.Tensor, generator: torch.Generator, weight: torch.Tensor | None = None) -> float:
        raise NotImplementedError

    def card_settings(self) -> dict[str, Any]:
        """Training settings recorded in the card (``training``)."""
        return {}

    def inference_settings(self) -> dict[str, Any]:
        """Extra ``inference`` settings of the card."""
        return {}

    def _descend(self, loss: torch.Tensor, name: str = "model") -> float:
        optimiser = self.optimisers[name]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # DistributedDataParallel averages the gradients across processes here
        optimiser.step()
        return float(loss.detach())


def masked_mse(output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the voxels where ``weight`` is 1 (all of them when it is None)."""
    if weight is None:
        return F.mse_loss(output, target)
    weight = weight.to(output.device, output.dtype).expand_as(output)
    return ((output - target) ** 2 * weight).sum() / weight.sum().clamp(min=1.0)


class Denoising(Objective):
    family = "dae"

    def step(self, clean, generator, weight=None):
        noise = self.config.get("noise", {"resolution": 16, "std": 0.2})
        noisy = clean + coarse_noise(clean.shape, noise["resolution"], noise["std"], generator) * (clean > 0)
        return self._descend(masked_mse(self.model(noisy.to(self.device)), clean.to(self.device), weight))

    def card_settings(self):
        return {"noise": self.config.get("noise", {"resolution": 16, "std": 0.2})}


class Reconstruction(Objective):
    family = "ae"

    def step(self, clean, generator, weight=None):
        clean = clean.to(self.device)
        return self._descend(masked_mse(self.model(clean), clean, weight))


class Variational(Objective):
    family = "vae"

    def step(self, clean, generator, weight=None):
        clean = clean.to(self.device)
        reconstruction, mu, logvar, _ = self.model(clean)
        # KL per image, divided by the voxels per image: the ELBO per voxel, weighted by beta.
        kl = (-0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)).mean() / clean[0].numel()
        loss = masked_mse(reconstruction, clean, weight) + float(self.config.get("kl_weight", 1.0)) * kl
        return self._descend(loss)

    def card_settings(self):
        return {"kl_weight": float(self.config.get("kl_weight", 1.0))}


class Adversarial(Objective):
    family = "gan"

    def __init__(self, config, device, wrap):
        super().__init__(config, device, wrap)
        self.discriminator = build_discriminator(config["discriminator"]).to(device)
        self.networks["discriminator"] = self.discriminator
        self.critic = wrap(self.discriminator)
        self.optimisers["discriminator"] = torch.optim.Adam(
            self.discriminator.parameters(), lr=float(config.get("discriminator_learning_rate", 1e-4)))
        from monai.losses import PatchAdversarialLoss

        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def step(self, clean, generator, weight=None):
        clean = clean.to(self.device)
        reconstruction = self.model(clean)
        fooling = self.adversarial(self.critic(reconstruction)[-1], target_is_real=True, for_discriminator=False)
        loss = masked_mse(reconstruction, clean, weight)
        self._descend(loss + float(self.config.get("adversarial_weight", 0.01)) * fooling)
        # Real and reconstructed images in one forward pass (DistributedDataParallel allows one per backward).
        scores = self.critic(torch.cat([clean, reconstruction.detach()]))[-1]
        real = self.adversarial(scores[:len(clean)], target_is_real=True, for_discriminator=True)
        fake = self.adversarial(scores[len(clean):], target_is_real=False, for_discriminator=True)
        self._descend(0.5 * (real + fake), "discriminator")
        return float(loss.detach())  # the curve shows reconstruction error, comparable across families

    def card_settings(self):
        return {"adversarial_weight": float(self.config.get("adversarial_weight", 0.01)),
                "discriminator": self.config["discriminator"]}


class Diffusion(Objective):
    family = "ddpm"

    def __init__(self, config, device, wrap):
        super().__init__(config, device, wrap)
        from monai.networks.schedulers import DDPMScheduler

        self.settings = {**DIFFUSION_DEFAULTS, **config.get("diffusion", {})}
        self.scheduler = DDPMScheduler(num_train_timesteps=int(self.settings["train_timesteps"]),
                                       schedule=self.settings["schedule"], beta_start=float(self.settings["beta_start"]),
                                       beta_end=float(self.settings["beta_end"]), clip_sample=False)

    def step(self, clean, generator, weight=None):
        x = to_diffusion_range(clean)
        noise = structured_noise(tuple(x.shape), self.settings["noise"], generator)
        t = torch.randint(0, int(self.settings["train_timesteps"]), (x.shape[0],), generator=generator)
        noisy = self.scheduler.add_noise(x, noise, t)
        predicted = self.model(noisy.to(self.device), timesteps=t.to(self.device))
        return self._descend(masked_mse(predicted, noise.to(self.device), weight))

    def inference_settings(self):
        return {"diffusion": dict(self.settings)}

    def card_settings(self):
        return {"diffusion": dict(self.settings)}


OBJECTIVES: dict[str, type[Objective]] = {o.family: o for o in (Denoising, Reconstruction, Variational, Adversarial,
                                                                  Diffusion)}


def build_discriminator(spec: dict[str, Any]) -> torch.nn.Module:
    """The GAN's critic (training only, never packaged): MONAI's PatchDiscriminator."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(**spec)


def objective_for(config: dict[str, Any], device: torch.device, wrap: Wrap) -> Objective:
    family = config.get("family", "dae")
    if family not in OBJECTIVES:
        raise ValueError(f"unknown model family {family!r}; trainable: {', '.join(FAMILIES)}")
    return OBJECTIVES[family](config, device, wrap)
