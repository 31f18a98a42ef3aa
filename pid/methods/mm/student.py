"""The moment-matching student: a denoiser-shaped generator g_η(z_t, σ_t) sampled with k ancestral steps (Alg. 1).

The module is the generator network itself (its state dict is the denoiser's, under `denoiser.`), plus what
sampling needs: k and the t→σ map (σ_min, σ_max, ρ; `pid.samplers.mm_sigma`). `generate` takes per-seed noise
(`randn_like`) so that a seed's image does not depend on the batch, as EDM's generate.py.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from pid.errors import CheckpointError
from pid.methods.mm.networks import build_denoiser
from pid.samplers import ancestral_sampler

__all__ = ["MMStudent", "build_mm_student_from_spec", "load_mm_student"]


class MMStudent(nn.Module):
    """g_η(x, σ, labels) → x̃ [N,C,H,W] float32, and k-step generation. `stochastic`: sampling draws noise."""

    stochastic = True

    def __init__(self, denoiser: nn.Module, denoiser_spec: dict, *, k: int, sigma_min: float, sigma_max: float,
                 rho: float, img_resolution: int, img_channels: int, label_dim: int, teacher: str | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.denoiser_spec = copy.deepcopy(denoiser_spec)
        self.k = int(k)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.img_resolution, self.img_channels, self.label_dim = int(img_resolution), int(img_channels), int(label_dim)
        self.teacher = teacher

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x̃ = g_η(x; σ): x [N,C,H,W] noisy images, σ scalar or [N], one-hot labels [N,label_dim] or None."""
        return self.denoiser(x, sigma, class_labels)

    def round_sigma(self, sigma) -> torch.Tensor:
        return self.denoiser.round_sigma(sigma)

    @torch.no_grad()
    def generate(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None,
                 randn_like: Callable = torch.randn_like, num_steps: int | None = None) -> torch.Tensor:
        """Algorithm 1 with `num_steps` (default: the trained k) calls: unit-normal latents [N,C,H,W] → [-1, 1]."""
        device = next(self.parameters()).device
        labels = None if class_labels is None else class_labels.to(device)
        x = ancestral_sampler(self, latents.to(device).float(), labels, randn_like=randn_like,
                              num_steps=num_steps or self.k, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                              rho=self.rho)
        return x.float().clamp(-1, 1)

    def export_spec(self) -> dict:
        """JSON-able description that rebuilds this module without its weights."""
        return {"class": "MMStudent", "denoiser": copy.deepcopy(self.denoiser_spec), "k": self.k,
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                "img_resolution": self.img_resolution, "img_channels": self.img_channels,
                "label_dim": self.label_dim, "teacher": self.teacher}


def build_mm_student_from_spec(spec: dict) -> MMStudent:
    """Rebuild an MMStudent (random weights) from `export_spec()` output."""
    if not isinstance(spec, dict) or spec.get("class") != "MMStudent":
        found = spec.get("class") if isinstance(spec, dict) else type(spec).__name__
        raise CheckpointError(f"not a moment-matching student (class {found!r}, expected 'MMStudent')")
    keys = ("k", "sigma_min", "sigma_max", "rho", "img_resolution", "img_channels", "label_dim", "teacher")
    return MMStudent(build_denoiser(spec["denoiser"]), spec["denoiser"], **{k: spec[k] for k in keys})


def load_mm_student(path: str, device: torch.device | str | None = None, ema: str | None = None) -> MMStudent:
    """Load an MM `student-<step>.pt` in eval mode with the chosen EMA weights (default: the file's)."""
    from pid.training.checkpoint import student_weights
    spec, weights = student_weights(path, ema)
    student = build_mm_student_from_spec(spec)
    student.load_state_dict(weights)
    return student.eval().requires_grad_(False).to(device or "cpu")
