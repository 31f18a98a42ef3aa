"""EDM's preconditioners (Karras et al. 2022, Table 1): wrap a backbone ``F`` into a denoiser
``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))``.

All four share the forward contract of ``docs/edm.md`` §3: x ``[N, C, H, W]`` (any float dtype, computed in
f32), σ a tensor of shape ``[N]``, ``[N, 1, 1, 1]`` or a scalar (broadcast), class labels ``[N, label_dim]``
one-hot (None -> a zero row; ignored when ``label_dim == 0``). fp16 is used only on CUDA with ``use_fp16``.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import torch

from .layers import keeps_init_kwargs
from .unets import DhariwalUNet, SongUNet

__all__ = ["VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond", "MODEL_TYPES"]

MODEL_TYPES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

SigmaLike = Union[torch.Tensor, float]


def _as_tensor(value: SigmaLike) -> torch.Tensor:
    """``torch.as_tensor`` that keeps a tensor where it is (even inside a ``torch.device`` context)."""
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


class _Precond(torch.nn.Module):
    """Shared plumbing: builds ``self.model`` and normalises inputs; subclasses give the coefficients."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool, model_type: str,
                 out_channels: int, model_kwargs: dict):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f'unknown model_type "{model_type}": expected one of {sorted(MODEL_TYPES)}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=out_channels, label_dim=label_dim, **model_kwargs)

    def _prepare(self, x: torch.Tensor, sigma: SigmaLike, class_labels: Optional[torch.Tensor], force_fp32: bool):
        """Cast x/σ to f32, σ to ``[-1, 1, 1, 1]``, labels per EDM's rules; pick the model dtype."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        return x, sigma, class_labels, (torch.float16 if use_half else torch.float32)

    def coefficients(self, sigma: torch.Tensor):
        """EDM Table 1 coefficients ``(c_skip, c_out, c_in, c_noise)`` for an f32 σ tensor (any shape).

        Each is a tensor shaped like σ or a Python number where it is constant (e.g. VP's c_skip = 1), computed
        exactly as in forward; ``c_noise.flatten()`` is what the backbone receives as noise_labels.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: SigmaLike, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, **model_kwargs: Any) -> torch.Tensor:
        """Denoise: x ``[N, C, H, W]`` at noise level σ -> D(x; σ) ``[N, C, H, W]`` f32 (EDM eq. 7)."""
        x, sigma, class_labels, dtype = self._prepare(x, sigma, class_labels, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        # Under torch.autocast the backbones return float32 (their output layers run in fp32, unets.py).
        assert F_x.dtype in (dtype, torch.float32), f"model returned {F_x.dtype}, expected {dtype}"
        return c_skip * x + c_out * F_x[:, :self.img_channels].to(torch.float32)

    def round_sigma(self, sigma: SigmaLike) -> torch.Tensor:
        """σ values the network supports; identity for continuous-time preconditioners."""
        return _as_tensor(sigma)


@keeps_init_kwargs
class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al. 2021, "DDPM++ cont. (VP)")."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000, epsilon_t: float = 1e-5,
                 model_type: str = "SongUNet", **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # Evaluated in f32 like EDM: sigma_min is exactly 0.0009765625 (f64 would give ~0.0010000).
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float32, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float32, device="cpu")))

    def coefficients(self, sigma: torch.Tensor):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return 1, -sigma, c_in, c_noise

    def sigma(self, t: SigmaLike) -> torch.Tensor:
        """σ(t) = sqrt(exp(½β_d t² + β_min t) − 1)."""
        t = _as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: SigmaLike) -> torch.Tensor:
        """t(σ) = (sqrt(β_min² + 2β_d ln(1+σ²)) − β_min) / β_d."""
        sigma = _as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


@keeps_init_kwargs
class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al. 2021, "NCSN++ cont. (VE)")."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0.02, sigma_max: float = 100, model_type: str = "SongUNet",
                 **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor):
        return 1, sigma, 1, (0.5 * sigma).log()


@keeps_init_kwargs
class iDDPMPrecond(_Precond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021): a discrete set of M+1 noise levels ``u``.

    The backbone predicts 2·img_channels outputs (mean and variance); only the first half is used.
    """

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 C_1: float = 0.001, C_2: float = 0.008, M: int = 1000, model_type: str = "DhariwalUNet",
                 **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels * 2,
                         model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.register_buffer("u", self._noise_levels())
        self.sigma_min = float(self.u[M - 1])
        self.sigma_max = float(self.u[0])

    def _noise_levels(self) -> torch.Tensor:
        """u[M] = 0; u[j−1] = sqrt((u[j]²+1) / max(ᾱ(j−1)/ᾱ(j), C_1) − 1), all in f32 on CPU."""
        u = torch.zeros(self.M + 1, dtype=torch.float32, device="cpu")
        for j in range(self.M, 0, -1):
            ratio = self.alpha_bar(j - 1) / self.alpha_bar(j)
            u[j - 1] = ((u[j] ** 2 + 1) / ratio.clip(min=self.C_1) - 1).sqrt()
        return u

    def alpha_bar(self, j: Union[int, torch.Tensor]) -> torch.Tensor:
        """ᾱ(j) = sin(½π·j/M/(C_2+1))², in f32."""
        j = torch.as_tensor(j, device="cpu")
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def coefficients(self, sigma: torch.Tensor):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = self.M - 1 - self.round_sigma(sigma, return_index=True).to(torch.float32)
        return 1, -sigma, c_in, c_noise

    def round_sigma(self, sigma: SigmaLike, return_index: bool = False) -> torch.Tensor:
        """Nearest supported level ``u[j]`` (or its index j), with σ's shape, dtype and device."""
        sigma = _as_tensor(sigma)
        query = sigma.to(self.u.device).to(torch.float32).reshape(1, -1, 1)
        index = torch.cdist(query, self.u.reshape(1, -1, 1)).argmin(2)
        result = index if return_index else self.u[index.flatten()].to(sigma.dtype)
        return result.reshape(sigma.shape).to(sigma.device)


@keeps_init_kwargs
class EDMPrecond(_Precond):
    """EDM's own preconditioning (Karras et al. 2022, Table 1 "Ours")."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float("inf"), sigma_data: float = 0.5,
                 model_type: str = "DhariwalUNet", **model_kwargs: Any):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, img_channels, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise
