"""Moment matching, Algorithm 2 (Salimans et al. 2024): alternating updates of the generator g_η and an
auxiliary denoiser g_φ, both initialised at the teacher g_θ (docs/moment_matching.md, "Resolved" section).

One micro-batch, for either phase (the trainer alternates: even steps update φ, odd steps update η):
    x ~ data, labels from the data;  s ~ U(0,1), δ ~ U(0,1/k), t = min(1, s+δ);  σ = σ(·) of pid.samplers.mm_sigma
    z_t = x + σ_t·ε;  x̃ = g_η(z_t, σ_t);  z_s ~ q(z_s | z_t, sg(x̃))  (float64 posterior, fresh noise)
    aux:        L(φ) = w(σ_s)·[ ‖sg(x̃) − g_φ(z_s)‖² + ‖sg(g_θ(z_s)) − g_φ(z_s)‖² ]
    generator:  L(η) = w(σ_s)·⟨ x̃, sg(g_φ(z_s) − g_θ(z_s)) ⟩    (a linear surrogate: only its gradient counts)
Squares and inner products are means over pixels. Random draws in this order: data, s, δ, ε, posterior noise.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from pid.errors import ConfigError
from pid.samplers import mm_sigma, ve_posterior

__all__ = ["MomentMatching", "WEIGHTS", "loss_weight"]

WEIGHTS = ("edm", "edm-bounded", "uniform")


def loss_weight(name: str, sigma: torch.Tensor, sigma_data: float = 0.5, sigma_floor: float = 0.1) -> torch.Tensor:
    """w(σ_s) per sample [B] float32.

    edm: EDM's λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (≈ 1/σ² for small σ); edm-bounded: λ(max(σ, σ_floor)), the same above
    σ_floor and constant below it; uniform: 1.
    """
    sigma = sigma.float()
    if name == "uniform":
        return torch.ones_like(sigma)
    if name == "edm-bounded":
        sigma = sigma.clamp(min=sigma_floor)
    elif name != "edm":
        raise ConfigError(f"unknown moment-matching weight {name!r}; choose one of {', '.join(WEIGHTS)}")
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class MomentMatching:
    """Algorithm 2 as a several-network `pid.training.Method`: networks {'generator': MMStudent, 'aux': denoiser}.

    teacher: frozen denoiser D(x, σ, labels); data: a `pid.data` source with `sample(position, count, generator,
    device) -> (x [B,C,H,W] in [-1,1], one-hot labels or None)`; k: sampling steps the generator is trained for;
    (sigma_min, sigma_max, rho): the t→σ map; weight/sigma_floor: w(σ_s); force_t1: t ≡ 1 (the k = 1 variant
    of one-step methods; by default k = 1 follows the general rule t = min(1, s + δ)); aux_lr_mult: the
    auxiliary denoiser's learning rate relative to the generator's.
    """

    name = "mm"
    export = "generator"
    ema_networks = ("generator",)

    def __init__(self, teacher: nn.Module, data, k: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                 weight: str = "edm", sigma_floor: float = 0.1, force_t1: bool = False, aux_lr_mult: float = 1.0):
        if k < 1:
            raise ConfigError(f"--k must be at least 1, got {k}")
        loss_weight(weight, torch.ones(1))  # validates the name now, not at the first step
        self.teacher, self.data, self.k = teacher, data, int(k)
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.weight, self.sigma_floor, self.force_t1 = weight, float(sigma_floor), bool(force_t1)
        if not aux_lr_mult > 0:
            raise ConfigError(f"--aux-lr-mult must be > 0, got {aux_lr_mult}")
        self.aux_lr_mult = float(aux_lr_mult)
        self.sigma_data = float(getattr(teacher, "sigma_data", 0.5))

    def to(self, device) -> "MomentMatching":
        self.teacher.to(device)
        return self

    def prepare(self, run_dir: str, dist=None, log=None) -> None:
        """Before the first step, on every process: a data source that makes its data (`--data=teacher`) does."""
        prepare = getattr(self.data, "prepare", None)
        if prepare is not None:
            prepare(run_dir, dist, log)

    def phase(self, step: int) -> str:
        """1:1 alternation by step parity: the auxiliary denoiser first (it must track the generator)."""
        return "aux" if step % 2 == 0 else "generator"

    def lr_scale(self, name: str) -> float:
        """The auxiliary denoiser may learn faster than the generator (it has to track it)."""
        return self.aux_lr_mult if name == "aux" else 1.0

    def config_dict(self) -> dict:
        return {"name": self.name, "k": self.k, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "rho": self.rho, "weight": self.weight, "sigma_floor": self.sigma_floor, "force_t1": self.force_t1,
                "algorithm": "alternating", "aux_lr_mult": self.aux_lr_mult}

    def draw_times(self, n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        """(σ_t, σ_s) float64 [n]: s ~ U(0,1), δ ~ U(0,1/k), t = min(1, s + δ) (or t = 1 with force_t1)."""
        dev = generator.device
        s = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
        delta = torch.rand(n, generator=generator, device=dev, dtype=torch.float64) / self.k
        t = torch.ones_like(s) if self.force_t1 else (s + delta).clamp(max=1.0)
        return (mm_sigma(t, self.sigma_min, self.sigma_max, self.rho),
                mm_sigma(s, self.sigma_min, self.sigma_max, self.rho))

    def sample_z_s(self, generator_net: nn.Module, x: torch.Tensor, labels, gen: torch.Generator,
                   grad: bool) -> tuple:
        """(x̃ with or without grad, z_s float32, σ_s float32 [B]) for clean data x [B,C,H,W]."""
        dev = x.device
        sigma_t, sigma_s = (v.to(dev) for v in self.draw_times(x.shape[0], gen))
        eps = torch.randn(x.shape, generator=gen, device=gen.device).to(dev)
        z_t = x.float() + sigma_t.float().view(-1, 1, 1, 1) * eps
        with torch.set_grad_enabled(grad):
            x_tilde = generator_net(z_t, sigma_t.float(), labels).float()
        mean, std = ve_posterior(z_t, x_tilde.detach(), sigma_t, sigma_s)
        noise = torch.randn(x.shape, generator=gen, device=gen.device, dtype=torch.float64).to(dev)
        return x_tilde, (mean + std * noise).float(), sigma_s.float()

    def loss(self, nets: Dict[str, nn.Module], batch_size: int, generator: torch.Generator, device: torch.device,
             ctx) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Per-sample losses [B] of this step's phase (with gradient into that network only) and stats."""
        x, labels = self.data.sample(ctx.position, batch_size, generator, device)
        gen_phase = ctx.phase == "generator"
        x_tilde, z_s, sigma_s = self.sample_z_s(nets["generator"], x, labels, generator, grad=gen_phase)
        w = loss_weight(self.weight, sigma_s, self.sigma_data, self.sigma_floor)
        with torch.no_grad():
            target = self.teacher(z_s, sigma_s, labels).float()
        with torch.set_grad_enabled(not gen_phase):
            aux = nets["aux"](z_s, sigma_s, labels).float()
        gap = (aux.detach() - target)
        stats = {"mm_gap_rms": gap.square().mean().sqrt()}
        if gen_phase:
            losses = w * (x_tilde * gap).flatten(1).mean(1)
        else:
            fit = (x_tilde.detach() - aux).square().flatten(1).mean(1)
            pull = (target - aux).square().flatten(1).mean(1)
            losses = w * (fit + pull)
            stats["aux_fit_rms"] = fit.detach().mean().sqrt()
        return losses, stats
