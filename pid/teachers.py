"""`load_teacher(spec)`: the teacher a user has, as one frozen denoiser `D(x, sigma, class_labels=None)`.

spec is an EDM network pickle (path, or http(s) URL downloaded once into the cache) or `builtin:<name>` for a
built-in analytic teacher (`pid.toy`). Every teacher exposes img_resolution, img_channels, label_dim,
sigma_min, sigma_max and sigma_data; EDM teachers also expose the wrapped preconditioner as `.net`.
"""

import math
import os
import pickle
import zipfile
from typing import Optional, Union

import torch
from torch import nn

from pid.download import cached_path, is_url
from pid.errors import CheckpointError

__all__ = ["EDMTeacher", "load_teacher", "BUILTIN_PREFIX", "default_sigma_range"]

BUILTIN_PREFIX = "builtin:"


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
                              f"URL, or builtin:glyphs32 / builtin:glyphs16.")
    try:
        data = edm_networks.load_network_pickle(path)
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"Cannot read {path} as an EDM network pickle ({type(exc).__name__}: {exc}); "
                              f"the file is corrupt or of another kind.") from None
    if not isinstance(data, dict) or data.get("ema") is None:
        raise CheckpointError(f"{path} holds no 'ema' network: it is not an EDM network pickle.")
    return EDMTeacher(data["ema"], spec)


def load_teacher(spec: Union[str, os.PathLike], device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Load a teacher as a frozen denoiser module (eval mode, parameters without grad) on `device`.

    spec: path of an EDM network pickle, an http(s) URL of one (cached download; offline raises
    `DownloadError` naming the URL and the cache path), or `builtin:glyphs32` / `builtin:glyphs16`.
    Unknown built-in names raise `ConfigError`; missing or unreadable files raise `CheckpointError`
    (or `edm_networks`' own pickle errors, which the CLIs also print as one line).
    """
    spec = os.fspath(spec)
    if spec.startswith(BUILTIN_PREFIX):
        from pid.toy import builtin_teacher
        return _freeze(builtin_teacher(spec[len(BUILTIN_PREFIX):]), device)
    path = cached_path(spec) if is_url(spec) else spec
    return _freeze(_load_edm_pickle(path, spec), device)
