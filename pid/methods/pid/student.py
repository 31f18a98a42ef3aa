"""The PID student: a one-step generator that models the teacher's whole probability-flow trajectory.

    x_θ(z, t) = (t/T)·z + (1 − t/T)·F_θ(c_in·z, c_noise(t), labels),   z ~ N(0, T²I),  T = σ_max,
    c_in = 1/sqrt(σ_data² + T²) (fixed: the image input is the same unit-variance noise for every t),

F_θ is a copy of the teacher's inner U-Net (weights included) and c_noise is the teacher's own noise
conditioning (PID reference, `docs/pid.md` §(b)). Teachers without a network (the analytic `builtin:`
teachers) get an architecture from a named preset, randomly initialised. One-step generation is x_θ(z, σ_min).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from pid.errors import CheckpointError, ConfigError
from pid.teachers import default_sigma_range
from pid.student_presets import PRESETS, build_network, build_preset_network, disable_dropout, network_spec

__all__ = ["NoiseConditioning", "PIDStudent", "student_from_teacher", "build_student_from_spec", "load_student",
           "is_student_checkpoint", "PRESETS"]

# Precond class name → (c_noise kind, constructor parameters it needs, their EDM defaults).
_PRECOND_NOISE = {
    "EDMPrecond": ("edm", {}),
    "VPPrecond": ("vp", {"beta_d": 19.9, "beta_min": 0.1, "M": 1000}),
    "VEPrecond": ("ve", {}),
    "iDDPMPrecond": ("iddpm", {"C_1": 0.001, "C_2": 0.008, "M": 1000}),
}


def iddpm_sigmas(C_1: float, C_2: float, M: int) -> torch.Tensor:
    """iDDPM's discrete σ table u[0..M] (f32, u[M] = 0, decreasing), as the iDDPMPrecond defines it (edm.md §3)."""
    def alpha_bar(j):
        return (0.5 * math.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2
    u = torch.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


class NoiseConditioning(nn.Module):
    """c_noise(σ) of the EDM preconditioners.

    edm ¼·ln σ; vp (M−1)·σ⁻¹(σ); ve ln(σ/2); iddpm M−1−argmin_j |σ−u_j| (edm.md §3).
    """

    def __init__(self, kind: str, **params: float):
        super().__init__()
        if kind not in ("edm", "vp", "ve", "iddpm"):
            raise ConfigError(f"unknown noise conditioning {kind!r}; expected edm, vp, ve or iddpm")
        self.kind, self.params = kind, dict(params)
        if kind == "iddpm":
            self.register_buffer("u", iddpm_sigmas(params["C_1"], params["C_2"], int(params["M"])), persistent=False)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ [B] (f32) → noise labels [B] (f32)."""
        sigma = sigma.float()
        if self.kind == "edm":
            return sigma.log() / 4
        if self.kind == "ve":
            return (0.5 * sigma).log()
        if self.kind == "vp":
            bd, bm, M = self.params["beta_d"], self.params["beta_min"], self.params["M"]
            t = ((bm ** 2 + 2 * bd * (1 + sigma ** 2).log()).sqrt() - bm) / bd
            return (M - 1) * t
        idx = torch.cdist(sigma.reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2).reshape(-1)
        return (self.params["M"] - 1 - idx).float()

    def spec(self) -> dict:
        return {"kind": self.kind, **self.params}


class PIDStudent(nn.Module):
    """x_θ(z, t) for z of std σ_max; see the module docstring. State dict keys: `net.<U-Net keys>`."""

    def __init__(self, net: nn.Module, network: dict, noise: dict, *, img_resolution: int, img_channels: int,
                 label_dim: int, sigma_min: float, sigma_max: float, sigma_data: float = 0.5,
                 teacher: str | None = None, teacher_meta: dict | None = None):
        super().__init__()
        self.net = net
        self.network = copy.deepcopy(network)        # {'class': ..., 'kwargs': ...} to rebuild `net`
        self.noise = NoiseConditioning(**noise)
        self.img_resolution, self.img_channels = int(img_resolution), int(img_channels)
        self.label_dim = int(label_dim)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.c_in = 1 / math.sqrt(self.sigma_data ** 2 + self.sigma_max ** 2)
        self.teacher, self.teacher_meta = teacher, dict(teacher_meta or {})

    def forward(self, z: torch.Tensor, t: torch.Tensor | float,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """z [B,C,H,W] (std σ_max), t [B] or scalar σ, class_labels [B,K] one-hot or None → x_θ(z, t) [B,C,H,W]."""
        z = z.float()
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(z.shape[0])
        labels = None
        if self.label_dim:  # as the EDM preconditioners: missing labels mean the all-zero row
            labels = (torch.zeros(z.shape[0], self.label_dim, device=z.device) if class_labels is None
                      else class_labels.float().reshape(-1, self.label_dim))
        f = self.net(self.c_in * z, self.noise(t), class_labels=labels)
        f = f[:, :self.img_channels].float()         # iDDPM networks also output variances
        s = (t / self.sigma_max).view(-1, 1, 1, 1)
        return s * z + (1 - s) * f

    @torch.no_grad()
    def generate(self, latents: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """One network call: unit-normal latents [N,C,H,W] (scaled by σ_max here) → images [N,C,H,W] in [-1, 1]."""
        z = latents.to(next(self.parameters()).device).float() * self.sigma_max
        if class_labels is not None:
            class_labels = class_labels.to(z.device)
        return self(z, self.sigma_min, class_labels).clamp(-1, 1)

    def export_spec(self) -> dict:
        """JSON-able description that rebuilds this module without its weights (see build_student_from_spec)."""
        return {"class": "PIDStudent", "network": copy.deepcopy(self.network), "noise": self.noise.spec(),
                "img_resolution": self.img_resolution, "img_channels": self.img_channels,
                "label_dim": self.label_dim, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "sigma_data": self.sigma_data, "teacher": self.teacher,
                "teacher_meta": copy.deepcopy(self.teacher_meta)}


def build_student_from_spec(spec: dict) -> PIDStudent:
    """Rebuild a (randomly initialised) PIDStudent from `export_spec()` output."""
    if not isinstance(spec, dict) or spec.get("class") != "PIDStudent":
        found = spec.get("class") if isinstance(spec, dict) else type(spec).__name__
        raise CheckpointError(f"not a PID student description (class {found!r}, expected 'PIDStudent')")
    net = build_network(spec["network"])
    keys = ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "sigma_data", "teacher",
            "teacher_meta")
    return PIDStudent(net, spec["network"], spec["noise"], **{k: spec[k] for k in keys})


def student_from_teacher(teacher: nn.Module, teacher_spec: str | None = None, preset: str | None = None,
                         sigma_min: float | None = None, sigma_max: float | None = None, seed: int = 0,
                         init: str | None = None) -> PIDStudent:
    """Make the student for a teacher from `pid.teachers.load_teacher`.

    EDM teachers (exposing the preconditioner as `.net`): F_θ = deep copy of `teacher.net.model` with its weights,
    c_noise of the precond class. Teachers without a network: the U-Net of `init` with its weights when given (an
    EDM network pickle, path/URL or builtin:<name>, of the teacher's image size, channels and classes), else the
    named preset (default by resolution), random init from `seed`, EDM c_noise. `init` and `preset` exclude each
    other. σ_min/σ_max default to the teacher's range clipped to [0.002, 80] (EDM's sampler).
    """
    meta = {k: getattr(teacher, k, None) for k in ("img_resolution", "img_channels", "label_dim", "sigma_min",
                                                   "sigma_max", "sigma_data")}
    precond = getattr(teacher, "net", None)
    if init is not None:
        if preset is not None:
            raise ConfigError(f"--student-init={init} and --student-preset={preset} both choose the student's "
                              f"network: give one of them")
        precond = _init_network(init, teacher)
    if precond is not None and hasattr(precond, "model") and preset is None:
        kind, defaults = _PRECOND_NOISE.get(type(precond).__name__, (None, None))
        if kind is None:
            raise ConfigError(f"cannot distill a teacher with preconditioner {type(precond).__name__}; "
                              f"supported: {', '.join(_PRECOND_NOISE)}")
        noise = {"kind": kind, **{k: getattr(precond, k, v) for k, v in defaults.items()}}
        net = copy.deepcopy(precond.model).float().train().requires_grad_(True)
        disable_dropout(net)
        network = network_spec(precond)
    else:
        if preset is None:
            preset = f"glyphs{teacher.img_resolution}"
        net, network = build_preset_network(preset, teacher.img_resolution, teacher.img_channels,
                                            teacher.label_dim, seed)
        noise = {"kind": "edm"}
    lo, hi = default_sigma_range(teacher)
    return PIDStudent(net, network, noise, img_resolution=teacher.img_resolution, img_channels=teacher.img_channels,
                      label_dim=teacher.label_dim,
                      sigma_min=float(sigma_min if sigma_min is not None else lo),
                      sigma_max=float(sigma_max if sigma_max is not None else hi),
                      sigma_data=float(getattr(teacher, "sigma_data", 0.5)), teacher=teacher_spec, teacher_meta=meta)


def _init_network(init: str, teacher: nn.Module) -> nn.Module:
    """The EDM preconditioner of the network pickle `init`, checked against the teacher's image format."""
    from pid.teachers import load_teacher
    source = load_teacher(init)
    precond = getattr(source, "net", None)
    if precond is None or not hasattr(precond, "model"):
        raise ConfigError(f"--student-init={init} is not an EDM network (it has no U-Net to copy); give an EDM "
                          f"network pickle, for example builtin:glyphs16-net")
    for key in ("img_resolution", "img_channels", "label_dim"):
        want, got = int(getattr(teacher, key)), int(getattr(source, key))
        if want != got:
            raise ConfigError(f"--student-init={init} has {key} {got}, the teacher {want}: the student must "
                              f"make the teacher's images; give a network of the teacher's format")
    return precond


def is_student_checkpoint(path: str) -> bool:
    """True when `path` is a student checkpoint written by the trainer (`student-<step>.pt`)."""
    from pid.training.checkpoint import is_student_checkpoint as _is
    return _is(path)


def load_student(path: str, device: torch.device | str | None = None, ema: str | None = None) -> PIDStudent:
    """Load `student-<step>.pt` as an eval-mode, frozen PIDStudent with the chosen EMA weights (default: the file's)."""
    from pid.training.checkpoint import student_weights
    spec, weights = student_weights(path, ema)
    student = build_student_from_spec(spec)
    student.load_state_dict(weights)
    return student.eval().requires_grad_(False).to(device or "cpu")
