"""`load_teacher(spec)`: the teacher a user has, as one frozen denoiser `D(x, sigma, class_labels=None)`.

spec is an EDM network pickle (path, or http(s) URL downloaded once into the cache), `builtin:<name>` for a
built-in analytic teacher (`pid.toy`), or `builtin:<name>-net` for a built-in network teacher: an EDM network
pickle shipped in `pid/assets/`, trained on the mixture `builtin:<name>` by `python -m pid.make_teacher`. Every
teacher exposes img_resolution, img_channels, label_dim, sigma_min, sigma_max and sigma_data; EDM teachers also
expose the wrapped preconditioner as `.net`, and a built-in network teacher the mixture it learned as
`.data_distribution` (for exact data and exact scores; its denoiser is the network alone).
"""

import hashlib
import math
import os
import pickle
import zipfile
from typing import Optional, Union

import torch
from torch import nn

from pid.download import cached_path, is_url
from pid.errors import CheckpointError, ConfigError

__all__ = ["EDMTeacher", "load_teacher", "BUILTIN_PREFIX", "BUILTIN_NETWORKS", "builtin_network_path",
           "default_sigma_range", "data_distribution", "teacher_names"]

BUILTIN_PREFIX = "builtin:"
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# builtin:<name> -> (file in pid/assets, the built-in mixture it was trained on). The files' sha256 sums are in
# pid/assets/SHA256SUMS and are checked on every load.
BUILTIN_NETWORKS = {"glyphs16-net": ("glyphs16-net.pkl", "glyphs16")}


def teacher_names() -> str:
    """'builtin:glyphs32 / builtin:glyphs16 / builtin:glyphs16-net', for messages."""
    from pid.toy import BUILTIN_TEACHERS
    return " / ".join(BUILTIN_PREFIX + n for n in [*BUILTIN_TEACHERS, *BUILTIN_NETWORKS])


def data_distribution(teacher):
    """The analytic mixture a teacher stands for: itself (built-in analytic teacher), the mixture a built-in
    network teacher learned (`.data_distribution`), or None (an EDM pickle of unknown data)."""
    if hasattr(teacher, "component_of") and hasattr(teacher, "log_prob"):
        return teacher
    return getattr(teacher, "data_distribution", None)


def builtin_network_path(name: str) -> str:
    """Path of the shipped pickle of `builtin:<name>`, after checking its sha256 against pid/assets/SHA256SUMS."""
    file, _ = BUILTIN_NETWORKS[name]
    path = os.path.join(ASSETS, file)
    sums = {}
    try:
        with open(os.path.join(ASSETS, "SHA256SUMS"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    digest, fname = line.split()
                    sums[fname.lstrip("*")] = digest
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"The built-in teacher builtin:{name} cannot be read ({exc}); reinstall pid "
                              f"(pip install -e .) or rebuild it with python -m pid.make_teacher.") from None
    if sums.get(file) != digest:
        raise CheckpointError(f"{path} does not match its sha256 in pid/assets/SHA256SUMS (the file was changed or "
                              f"damaged); restore it (git checkout pid/assets) or reinstall pid.")
    return path


def default_sigma_range(teacher: nn.Module) -> tuple:
    """(σ_min, σ_max) of the distillation: the teacher's range clipped to EDM's sampler defaults [0.002, 80].

    EDM's released EDMPrecond pickles carry σ ∈ [0, ∞); like EDM's generate.py, we clip to [0.002, 80].
    """
    lo = max(0.002, float(getattr(teacher, "sigma_min", 0.0)))
    hi = min(80.0, float(getattr(teacher, "sigma_max", math.inf)))
    return lo, hi


class EDMTeacher(nn.Module):
    """A frozen EDM preconditioner (EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond) seen as a denoiser.

    `net` is the preconditioner itself (its `.model` is the inner U-Net); `precond_class` names its class.
    sigma_data is the preconditioner's own (EDMPrecond) or 0.5, EDM's CIFAR-10/ImageNet data std, otherwise.
    """

    def __init__(self, net: nn.Module, spec: str = ""):
        super().__init__()
        self.net = net
        self.name = spec
        self.precond_class = type(net).__name__
        self.img_resolution = int(net.img_resolution)
        self.img_channels = int(net.img_channels)
        self.label_dim = int(net.label_dim)
        self.sigma_min = float(net.sigma_min)
        self.sigma_max = float(net.sigma_max)
        self.sigma_data = float(getattr(net, "sigma_data", 0.5))

    def round_sigma(self, sigma) -> torch.Tensor:
        """The preconditioner's σ rounding (nearest discrete level for iDDPM, identity otherwise)."""
        return self.net.round_sigma(sigma)

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D(x; σ), x [N,C,H,W], sigma scalar or [N]; float32 output as the preconditioner returns it."""
        return self.net(x, sigma, class_labels)


def _freeze(module: nn.Module, device) -> nn.Module:
    module = module.eval().requires_grad_(False)
    return module.to(device) if device is not None else module


def _load_edm_pickle(path: str, spec: str) -> EDMTeacher:
    import edm_networks  # heavy-ish; only for EDM teachers
    if not os.path.isfile(path):
        raise CheckpointError(f"Teacher file not found: {path}. Pass an EDM network pickle (.pkl), an http(s) "
                              f"URL, or {teacher_names()}.")
    try:
        data = edm_networks.load_network_pickle(path)
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"Cannot read {path} as an EDM network pickle ({type(exc).__name__}: {exc}); "
                              f"the file is corrupt or of another kind.") from None
    if not isinstance(data, dict) or data.get("ema") is None:
        raise CheckpointError(f"{path} holds no 'ema' network: it is not an EDM network pickle.")
    return EDMTeacher(data["ema"], spec)


def _is_analytic(name: str) -> bool:
    from pid.toy import BUILTIN_TEACHERS
    return name in BUILTIN_TEACHERS


def load_teacher(spec: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Load a teacher as a frozen denoiser module (eval mode, parameters without grad) on `device`.

    spec: path of an EDM network pickle, an http(s) URL of one (cached download; offline raises
    `DownloadError` naming the URL and the cache path), `builtin:glyphs32` / `builtin:glyphs16` (analytic), or
    `builtin:glyphs16-net` (the shipped network teacher: an EDMTeacher with `.data_distribution`).
    Unknown built-in names raise `ConfigError`; missing or unreadable files raise `CheckpointError`
    (or `edm_networks`' own pickle errors, which the CLIs also print as one line).
    """
    spec = os.fspath(spec)
    if spec.startswith(BUILTIN_PREFIX):
        from pid.toy import builtin_teacher
        name = spec[len(BUILTIN_PREFIX):]
        if name in BUILTIN_NETWORKS:
            teacher = _load_edm_pickle(builtin_network_path(name), spec)
            teacher.data_distribution = builtin_teacher(BUILTIN_NETWORKS[name][1])
            return _freeze(teacher, device)
        if not _is_analytic(name):
            raise ConfigError(f"Unknown built-in teacher {spec!r}. Available: {teacher_names().replace(' /', ',')}.")
        return _freeze(builtin_teacher(name), device)
    path = cached_path(spec) if is_url(spec) else spec
    return _freeze(_load_edm_pickle(path, spec), device)
