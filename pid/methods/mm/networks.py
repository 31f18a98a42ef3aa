"""Trainable denoisers for moment matching: the generator g_η and the auxiliary g_φ both start *at* the teacher.

* EDM teacher: `EDMDenoiser`, a copy of the teacher's preconditioner with its weights, D(x; σ) = c_skip·x +
  c_out·F(c_in·x, c_noise) with the preconditioner's own coefficients (any of EDM's four).
* Built-in analytic teacher (no network to copy): `MixtureResidualDenoiser`, the exact denoiser plus a residual
  c_out(σ)·F(c_in·x, c_noise(σ)) whose network F comes from a student preset with its output layer zeroed, so that
  it equals the teacher exactly at initialisation and can still learn anything a network can represent.

A denoiser spec (`denoiser_spec`) is JSON-able and rebuilds the module without weights (`build_denoiser`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pid.errors import CheckpointError, ConfigError
from pid.student_presets import build_network, build_preset_network, disable_dropout

__all__ = ["EDMDenoiser", "MixtureResidualDenoiser", "denoiser_from_teacher", "build_denoiser"]

_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond")


class EDMDenoiser(nn.Module):
    """A trainable EDM preconditioner `precond` (its `.model` is the U-Net), called as D(x, sigma, labels).

    Runs the U-Net in float32 (autocast may lower it) and returns float32 [N,C,H,W]; EDM's own fp16 switch
    (`use_fp16`) is left to the trainer's `--precision`.
    """

    def __init__(self, precond: nn.Module):
        super().__init__()
        self.precond = precond
        self.img_channels = int(precond.img_channels)

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x, sigma, labels, _ = self.precond._prepare(x, sigma, class_labels, force_fp32=True)
        c_skip, c_out, c_in, c_noise = self.precond.coefficients(sigma)
        f = self.precond.model(c_in * x, c_noise.flatten().expand(x.shape[0]) if c_noise.numel() == 1
                               else c_noise.flatten(), class_labels=labels)
        return c_skip * x + c_out * f[:, :self.img_channels].float()

    def round_sigma(self, sigma) -> torch.Tensor:
        return self.precond.round_sigma(sigma)


class MixtureAdjust(nn.Module):
    """σ-dependent corrections of the mixture's own parameters, all zero at initialisation.

    For log σ it gives [N, K+2]: K logit offsets b_k(σ), a log-scale γ(σ) of the distance term and a log-gain
    h(σ) of the within-component shrinkage, each a linear function of `n_basis` Gaussian bumps spread over
    log σ ∈ [log σ_lo, log σ_hi]. The mixture denoiser then uses
        w = softmax(log π_k + b_k − e^γ ‖x − μ_k‖² / 2(s² + σ²)),
        D = Σ_k w_k μ_k + e^h s²/(s² + σ²) (x − Σ_k w_k μ_k),
    i.e. the teacher's family with σ-dependent weights, sharpness and within-component spread, which is where a
    few-step sampler of a mixture errs (mode frequencies, too-smooth samples).
    """

    def __init__(self, components: int, sigma_lo: float = 0.002, sigma_hi: float = 80.0, n_basis: int = 16):
        super().__init__()
        lo, hi = math.log(sigma_lo), math.log(sigma_hi)
        self.register_buffer("centers", torch.linspace(lo, hi, n_basis))
        self.width = (hi - lo) / (n_basis - 1)
        self.linear = nn.Linear(n_basis, components + 2)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """sigma [N] float32 → [N, K+2] float32 (b_1..b_K, γ, h)."""
        u = (sigma.float().log()[:, None] - self.centers[None]) / self.width
        return self.linear(torch.exp(-0.5 * u * u))


class MixtureResidualDenoiser(nn.Module):
    """Exact mixture denoiser + c_out(σ)·F(c_in(σ)·x, ¼·ln σ, labels), EDM's coefficients with σ_data.

    `teacher` is a `pid.toy.GaussianMixtureTeacher` (its buffers travel in the state dict; it has no parameters);
    `net` an EDM U-Net whose output layer is zero at initialisation; `adjust` an optional `MixtureAdjust`
    (zero-initialised σ-dependent weights, sharpness and spread of the mixture part).
    """

    def __init__(self, teacher: nn.Module, net: nn.Module, sigma_data: float = 0.5, adjust: nn.Module | None = None):
        super().__init__()
        self.teacher, self.net, self.adjust = teacher, net, adjust
        self.sigma_data = float(sigma_data)
        self.img_channels, self.label_dim = int(teacher.img_channels), int(teacher.label_dim)

    def _mixture(self, x: torch.Tensor, sigma: torch.Tensor, class_labels) -> torch.Tensor:
        """The mixture part in float64 (the exact teacher when there is no `adjust`), returned as float32."""
        t = self.teacher
        if self.adjust is None:
            with torch.no_grad():   # the exact part has no parameters; x never needs a gradient here
                return t(x.double(), sigma.double(), class_labels).float()
        with torch.no_grad():
            var = t._variance(sigma.double(), x.shape[0], x.device)
            prior, dist = t._prior(class_labels, x.shape[0]), t._sq_dist(x) / (2 * var)
        a = self.adjust(sigma).double()
        k = t.means.shape[0]
        logits = prior + a[:, :k] - a[:, k:k + 1].exp() * dist
        return t.combine(x, logits, a[:, k + 1:].exp() * t.std ** 2 / var).float()

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma
        base = self._mixture(x, sigma, class_labels)
        s4, sd = sigma.view(-1, 1, 1, 1), self.sigma_data
        c_in, c_out = 1 / (s4 ** 2 + sd ** 2).sqrt(), s4 * sd / (s4 ** 2 + sd ** 2).sqrt()
        labels = None
        if self.label_dim:
            labels = (torch.zeros(x.shape[0], self.label_dim, device=x.device) if class_labels is None
                      else class_labels.float().reshape(-1, self.label_dim))
        f = self.net(c_in * x, sigma.log() / 4, class_labels=labels)
        return base + c_out * f[:, :self.img_channels].float()

    def round_sigma(self, sigma) -> torch.Tensor:
        return torch.as_tensor(sigma)


def _zero_output_layers(net: nn.Module, channels: int) -> None:
    """Zero the convolutions that produce the image (out_conv, SongUNet's aux_conv): F ≡ 0 at initialisation."""
    found = False
    for m in net.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim == 4 and w.shape[0] in (channels, 2 * channels):
            found = True
            with torch.no_grad():
                w.zero_()
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    if not found:
        raise ConfigError("the residual network has no image-output convolution to start at zero")


def denoiser_from_teacher(teacher: nn.Module, teacher_spec: str | None, preset: str | None = None,
                          seed: int = 0, mixture_adjust: bool = False) -> tuple[nn.Module, dict]:
    """(trainable denoiser equal to `teacher`, its spec) for an EDM or a built-in teacher (see module docstring)."""
    precond = getattr(teacher, "net", None)
    if precond is not None and hasattr(precond, "model"):
        cls = type(precond).__name__
        if cls not in _PRECONDS:
            raise ConfigError(f"cannot distill a teacher with preconditioner {cls}; supported: {', '.join(_PRECONDS)}")
        kwargs = getattr(precond, "init_kwargs", None)
        if kwargs is None:
            raise ConfigError(f"cannot describe the teacher network {cls}: it has no init_kwargs")
        copy_ = copy.deepcopy(precond).float().train().requires_grad_(True)
        disable_dropout(copy_)
        kwargs = copy.deepcopy(dict(kwargs))
        return EDMDenoiser(copy_), {"kind": "edm", "class": cls, "kwargs": kwargs, "teacher": teacher_spec}
    if not (hasattr(teacher, "means") and hasattr(teacher, "component_of")):
        raise ConfigError(f"moment matching needs an EDM network pickle or a built-in teacher, "
                          f"got {type(teacher).__name__}")
    preset = preset or f"glyphs{teacher.img_resolution}"
    net, network = build_preset_network(preset, teacher.img_resolution, teacher.img_channels, teacher.label_dim, seed)
    _zero_output_layers(net, teacher.img_channels)
    sigma_data = float(getattr(teacher, "sigma_data", 0.5))
    spec = {"kind": "mixture-residual", "teacher": teacher_spec, "network": network, "sigma_data": sigma_data,
            "adjust": _adjust_spec(teacher) if mixture_adjust else None}
    return MixtureResidualDenoiser(copy.deepcopy(teacher), net, sigma_data, _build_adjust(spec["adjust"])), spec


def _adjust_spec(teacher: nn.Module) -> dict:
    return {"components": int(teacher.means.shape[0]), "sigma_lo": float(min(teacher.sigma_min, 0.002)),
            "sigma_hi": float(max(teacher.sigma_max, 80.0)), "n_basis": 16}


def _build_adjust(spec: dict | None) -> nn.Module | None:
    return None if spec is None else MixtureAdjust(**spec)


def build_denoiser(spec: dict) -> nn.Module:
    """Rebuild a denoiser (random weights; load a state dict next) from `denoiser_from_teacher`'s spec."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "edm":
        import edm_networks
        if spec.get("class") not in _PRECONDS:
            raise CheckpointError(f"unknown preconditioner {spec.get('class')!r} in the checkpoint")
        return EDMDenoiser(getattr(edm_networks, spec["class"])(**copy.deepcopy(spec["kwargs"])))
    if kind == "mixture-residual":
        from pid.teachers import load_teacher
        teacher = load_teacher(spec["teacher"])
        return MixtureResidualDenoiser(teacher, build_network(spec["network"]), spec["sigma_data"],
                                       _build_adjust(spec.get("adjust")))
    raise CheckpointError(f"unknown moment-matching denoiser kind {kind!r} in the checkpoint")
