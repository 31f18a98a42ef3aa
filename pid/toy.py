"""Built-in analytic teachers: isotropic Gaussian mixtures whose EDM denoiser is exact.

For data p(x) = Σ_k π_k N(x; μ_k, s²I), the noisy marginal at level σ is Σ_k π_k N(x; μ_k, (s²+σ²)I),
and the ideal denoiser (EDM eq. 3) is
    D(x; σ) = Σ_k w_k(x, σ) [μ_k + s²/(s²+σ²) (x − μ_k)],  w = softmax_k(log π_k − ‖x − μ_k‖² / (2(s²+σ²))).
Everything is computed in float64 with a max-shifted log-sum-exp, so the teacher is exact to rounding.
"""

import functools
import math
from typing import Optional

import torch
from torch import nn

from pid.errors import ConfigError

__all__ = ["GaussianMixtureTeacher", "BUILTIN_TEACHERS", "builtin_teacher"]


class GaussianMixtureTeacher(nn.Module):
    """Exact EDM denoiser `D(x, sigma, class_labels=None)` of a class-labelled isotropic Gaussian mixture.

    means: [K,C,H,W] component means (images in [-1,1]); component_labels: [K] class of each component;
    log_weights: [K] log mixture weights (normalized here; uniform when None); std: data std s of each component.
    Class labels are one-hot rows [N,label_dim] (soft rows weight the classes); None means the whole mixture.
    """

    def __init__(self, means: torch.Tensor, component_labels: torch.Tensor, std: float,
                 log_weights: Optional[torch.Tensor] = None, label_dim: Optional[int] = None,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        k = means.shape[0]
        labels = torch.as_tensor(component_labels, dtype=torch.int64).reshape(k)
        lw = torch.zeros(k, dtype=torch.float64) if log_weights is None else torch.as_tensor(
            log_weights, dtype=torch.float64).reshape(k)
        self.register_buffer("means", means)
        self.register_buffer("component_labels", labels)
        self.register_buffer("log_weights", lw - torch.logsumexp(lw, 0))
        self.std = float(std)
        self.img_channels, self.img_resolution = int(means.shape[1]), int(means.shape[2])
        self.label_dim = int(label_dim) if label_dim is not None else int(labels.max()) + 1
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def extra_repr(self) -> str:
        return (f"components={self.means.shape[0]}, shape={tuple(self.means.shape[1:])}, std={self.std}, "
                f"label_dim={self.label_dim}")

    def round_sigma(self, sigma) -> torch.Tensor:
        """No rounding: any σ is valid (as EDMPrecond)."""
        return torch.as_tensor(sigma)

    def _prior(self, class_labels: Optional[torch.Tensor], n: int) -> torch.Tensor:
        """log p(k | labels) [N,K] (or [1,K] without labels): within-class renormalized weights."""
        if class_labels is None:
            return self.log_weights[None]
        y = torch.as_tensor(class_labels, device=self.means.device).to(torch.float64).reshape(-1, self.label_dim)
        if y.shape[0] not in (1, n):
            raise ValueError(f"class_labels has {y.shape[0]} rows for a batch of {n}")
        if (y < 0).any():
            raise ValueError("class_labels must be non-negative (one-hot rows)")
        # p(k | y) = y_c(k) · π_k / Π_c(k), with Π_c the total weight of class c
        mass = torch.zeros(self.label_dim, dtype=torch.float64, device=y.device).index_add(
            0, self.component_labels, self.log_weights.exp())
        # an all-zero row (what EDM's conditional nets get for "no label") means the whole mixture: y = Π
        y = torch.where(y.sum(dim=1, keepdim=True) > 0, y, mass[None])
        y = (y / y.sum(dim=1, keepdim=True))[:, self.component_labels]
        # -inf outside the class, written so that forward-mode derivatives (Algorithm 3's JVP over means and
        # log_weights) stay finite there: log(0) would give a 0/0 tangent
        log_y = torch.where(y > 0, y.clamp(min=torch.finfo(y.dtype).tiny).log(), -torch.inf)
        return log_y + self.log_weights[None] - mass.log()[self.component_labels][None]

    def _sq_dist(self, x: torch.Tensor) -> torch.Tensor:
        """‖x − μ_k‖² [N,K] in float64; x [N,C,H,W]."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        mu = self.means.reshape(self.means.shape[0], -1)
        d2 = (flat * flat).sum(1, keepdim=True) - 2 * flat @ mu.T + (mu * mu).sum(1)[None]
        return d2.clamp(min=0)

    def _logits(self, x: torch.Tensor, var: torch.Tensor, class_labels) -> torch.Tensor:
        """log π_k(labels) − ‖x − μ_k‖² / (2 var), [N,K]; var [N,1] total variance s² + σ²."""
        return self._prior(class_labels, x.shape[0]) - self._sq_dist(x) / (2 * var)

    def _variance(self, sigma, n: int, device, std=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=device).reshape(-1, 1)
        return ((self.std if std is None else std) ** 2 + sigma ** 2).expand(n, 1)

    def forward(self, x: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None,
                std: Optional[torch.Tensor] = None) -> torch.Tensor:
        """D(x; σ): x [N,C,H,W] noisy images, sigma scalar, [N] or [N,1,1,1]; returns [N,C,H,W] in x's dtype.

        std: the component std as a float64 scalar tensor instead of `self.std` (Algorithm 3 differentiates it).
        """
        var = self._variance(sigma, x.shape[0], x.device, std)
        out = self.combine(x, self._logits(x, var, class_labels), ((self.std if std is None else std) ** 2) / var)
        return out.to(x.dtype) if x.is_floating_point() else out

    def combine(self, x: torch.Tensor, logits: torch.Tensor, shrink: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k μ_k + shrink·(x − Σ_k w_k μ_k) with w = softmax(logits), float64 [N,C,H,W].

        logits [N,K] (or [1,K]); shrink [N,1] or scalar: s²/(s² + σ²) for the exact denoiser."""
        w = torch.softmax(logits, dim=1)  # softmax subtracts the max: stable
        mean = (w @ self.means.reshape(self.means.shape[0], -1)).reshape(x.shape)
        shrink = torch.as_tensor(shrink, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
        return mean + shrink * (x.to(torch.float64) - mean)

    def component_of(self, x: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Most likely component (posterior argmax at σ=0) of each image, int64 [N]."""
        var = self._variance(0.0, x.shape[0], x.device)
        return self._logits(x, var, class_labels).argmax(dim=1)

    def log_prob(self, x: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log p(x) (or log p(x | class)) in nats per image, float64 [N]; x [N,C,H,W]."""
        var = self._variance(0.0, x.shape[0], x.device)
        dim = self.means[0].numel()
        log_norm = -0.5 * dim * math.log(2 * math.pi * self.std ** 2)
        return torch.logsumexp(self._logits(x, var, class_labels), dim=1) + log_norm

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None,
                    class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """n exact samples of the data distribution, float64 [n,C,H,W] (class-conditional when labels given)."""
        probs = self._prior(class_labels, n).exp().expand(n, -1)
        comp = torch.multinomial(probs.cpu(), 1, generator=generator).reshape(n)
        noise = torch.randn([n, *self.means.shape[1:]], dtype=torch.float64, generator=generator)
        return self.means[comp.to(self.means.device)] + self.std * noise.to(self.means.device)


# name -> (resolution, components per class, std). Small std: components are well separated, yet the
# data is not degenerate so log-likelihoods stay finite.
BUILTIN_TEACHERS = {
    "glyphs32": dict(resolution=32, per_class=5, std=0.05),
    "glyphs16": dict(resolution=16, per_class=3, std=0.05),
}


@functools.lru_cache(maxsize=None)
def _cached_glyph_means(resolution: int, per_class: int):
    """Rendering takes seconds and the result never changes within an install: render once per process."""
    from pid.glyphs import glyph_means  # numpy rendering, only needed here
    means, labels = glyph_means(resolution, per_class)
    means.setflags(write=False)
    return means, tuple(labels)


def builtin_teacher(name: str) -> GaussianMixtureTeacher:
    """The built-in glyph mixture `name` ('glyphs32': 3x32x32, 50 components; 'glyphs16': 3x16x16, 30)."""
    if name not in BUILTIN_TEACHERS:
        raise ConfigError(f"Unknown built-in teacher 'builtin:{name}'. Available: "
                          + ", ".join(f"builtin:{k}" for k in BUILTIN_TEACHERS) + ".")
    cfg = BUILTIN_TEACHERS[name]
    means, labels = _cached_glyph_means(cfg["resolution"], cfg["per_class"])
    teacher = GaussianMixtureTeacher(torch.tensor(means), torch.tensor(labels), std=cfg["std"], label_dim=10)
    teacher.name = f"builtin:{name}"
    return teacher
