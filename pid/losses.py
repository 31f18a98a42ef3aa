"""The PID objective (Physics Informed Distillation, Tee et al. 2024) and the image distances it uses.

Distances `l2`, `l1`, `pseudo-huber` and `lpips` (VGG) map two image batches in [-1, 1] of shape [B, C, H, W]
to per-sample distances [B] (float32). LPIPS is imported lazily so that `import pid` stays light.
`PIDObjective` implements the trainer's `Method` protocol (see pid.training).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pid.errors import ConfigError, DownloadError

__all__ = ["DistanceConfig", "DISTANCES", "make_distance", "LPIPSDistance", "load_vgg16_features", "write_random_vgg16",
           "karras_grid", "pair_indices", "default_sigma_range", "PIDObjective"]

DISTANCES = ("lpips", "l2", "l1", "pseudo-huber")
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DistanceConfig:
    """Which distance to use and its knobs.

    name: one of DISTANCES. huber_c: pseudo-Huber c; None → 0.00054·sqrt(C·H·W) (the value used by improved
    consistency training, scaled with the image size). lpips_resize: side length images are bilinearly resized to
    before LPIPS (224 as the reference; 0 = no resize). lpips_vgg: path of a torchvision VGG16 state dict
    (`vgg16-397923af.pth`); None → torchvision's cache, downloading it if possible.
    """
    name: str = "l2"
    huber_c: float | None = None
    lpips_resize: int = 224
    lpips_vgg: str | None = None


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1)


def l2_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: [B,C,H,W] × 2 → [B]."""
    return (_flat(x) - _flat(y)).square().mean(dim=1)


def l1_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute error per sample: [B,C,H,W] × 2 → [B]."""
    return (_flat(x) - _flat(y)).abs().mean(dim=1)


def pseudo_huber_distance(x: torch.Tensor, y: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(||x − y||² + c²) − c per sample, [B]; quadratic for small errors, linear for large ones.

    c defaults to 0.00054·sqrt(C·H·W) (0.03 for 3×32×32 images).
    """
    d = _flat(x) - _flat(y)
    if c is None:
        c = 0.00054 * math.sqrt(d.shape[1])
    return (d.square().sum(dim=1) + c * c).sqrt() - c


def _vgg_cache_file() -> str:
    import torchvision
    url = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


# Conv layer indices of torchvision's VGG16 `features` and their output widths.
_VGG16_CONVS = list(zip([0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28],
                        [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]))


def write_random_vgg16(path: str, seed: int = 0) -> str:
    """Write a torchvision-format VGG16 `features` state dict with random (He-scaled) weights; returns `path`.

    A stand-in for `vgg16-397923af.pth` with the right keys and shapes, so the LPIPS code path (and its cost)
    can be exercised offline; its distances are of course not LPIPS's.
    """
    g, state, cin = torch.Generator().manual_seed(seed), {}, 3
    for idx, cout in _VGG16_CONVS:
        state[f"features.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2 / (9 * cin))
        state[f"features.{idx}.bias"] = torch.zeros(cout)
        cin = cout
    torch.save(state, path)
    return str(path)


def load_vgg16_features(path: str | None = None, download: bool = True) -> dict[str, torch.Tensor]:
    """State dict of torchvision's ImageNet VGG16 (keys `features.<i>.weight|bias`).

    Looks at `path` if given, else torchvision's cache (`$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`), and
    downloads into that cache when `download` is true. Raises DownloadError explaining how to provide the file.
    """
    target = path or _vgg_cache_file()
    if os.path.isfile(target):
        return torch.load(target, map_location="cpu", weights_only=True)
    if path is not None:
        raise DownloadError(f"VGG16 weights file not found: {path}. Pass the path of torchvision's "
                            f"vgg16-397923af.pth (--lpips-vgg), or choose another distance "
                            f"(--loss=l2|l1|pseudo-huber).")
    if download:
        import torchvision
        try:
            return torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # offline, proxy, ... all mean the same thing to the user
            reason = f" ({type(exc).__name__}: {exc})"
    else:
        reason = ""
    url = __import__("torchvision").models.VGG16_Weights.IMAGENET1K_V1.url
    raise DownloadError(f"LPIPS needs torchvision's ImageNet VGG16 weights, which are not in the cache {target} and "
                        f"could not be downloaded{reason}. Download {url} to that path (or pass its location with "
                        f"--lpips-vgg), or choose a distance that needs no download (--loss=l2|l1|pseudo-huber).")


class LPIPSDistance(nn.Module):
    """LPIPS (the `lpips` package, VGG backbone, linear layers v0.1) on images in [-1, 1].

    Images smaller than `resize` are bilinearly upsampled to resize×resize first, as the PID reference does
    (resize=0 keeps the native size). The backbone and linear weights are frozen.
    """

    def __init__(self, resize: int = 224, vgg_path: str | None = None, download: bool = True):
        super().__init__()
        import lpips  # heavy: imported only when LPIPS is actually requested
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # random VGG: no download here
        self._load_backbone(load_vgg16_features(vgg_path, download))
        self.model.eval().requires_grad_(False)
        self.resize = int(resize)

    def _load_backbone(self, sd: dict[str, torch.Tensor]) -> None:
        # lpips splits vgg.features into slices whose children keep their original indices as names.
        for slice_ in (self.model.net.slice1, self.model.net.slice2, self.model.net.slice3,
                       self.model.net.slice4, self.model.net.slice5):
            for name, layer in slice_.named_children():
                if isinstance(layer, nn.Conv2d):
                    layer.weight.data.copy_(sd[f"features.{name}.weight"])
                    layer.bias.data.copy_(sd[f"features.{name}.bias"])

    def train(self, mode: bool = True) -> "LPIPSDistance":  # always eval: no dropout in the linear heads
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B,C,H,W] × 2 in [-1, 1] → [B]."""
        if self.resize and x.shape[-1] < self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:  # VGG wants RGB
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        return self.model(x, y).flatten().float()


def make_distance(config: DistanceConfig | str, device: torch.device | str | None = None) -> Distance:
    """Build a per-sample distance `d(x, y) -> [B]` from a config or a name."""
    if isinstance(config, str):
        config = DistanceConfig(name=config)
    name = config.name
    if name == "l2":
        return l2_distance
    if name == "l1":
        return l1_distance
    if name == "pseudo-huber":
        c = config.huber_c
        return lambda x, y: pseudo_huber_distance(x, y, c)
    if name == "lpips":
        return LPIPSDistance(config.lpips_resize, config.lpips_vgg).to(device or "cpu")
    raise ConfigError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")


def karras_grid(num: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """N-point Karras σ grid, float64 [num], index 0 = sigma_max, index num−1 = sigma_min (PID §(a))."""
    if num < 2:
        raise ConfigError(f"the discretization needs at least 2 grid points, got {num}")
    n = torch.arange(num, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + n / (num - 1) * (lo - hi)) ** rho


def pair_indices(n: torch.Tensor, num: int) -> torch.Tensor:
    """The neighbour used for the finite difference: n+1, except the last index N−1, which pairs with N−2."""
    m = n + 1
    return torch.where(m == num, torch.full_like(m, num - 2), m)


def default_sigma_range(teacher: nn.Module) -> tuple[float, float]:
    """(σ_min, σ_max) of the distillation: the teacher's range clipped to EDM's sampler defaults [0.002, 80].

    EDM's released EDMPrecond pickles carry σ ∈ [0, ∞); like EDM's generate.py, we clip to [0.002, 80].
    """
    lo = max(0.002, float(getattr(teacher, "sigma_min", 0.0)))
    hi = min(80.0, float(getattr(teacher, "sigma_max", math.inf)))
    return lo, hi


class PIDObjective:
    """The PID residual loss, one micro-batch at a time (implements the trainer's `Method` protocol).

    For z ~ N(0, T²I) and a grid index n drawn uniformly from {0..N−1} per sample (t = t_n, t' = t_{n'}):
        X, X' = x_θ(z, t), x_θ(z, t')                 (one student call on the 2B batch; both carry gradient)
        lhs   = X − t·(X − X')/(t − t')               (x − t·dx/dt with a first-order finite difference)
        rhs   = D_φ(sg(X), t)                         (teacher, no gradient at all)
        loss  = d(lhs, rhs), time weight 1.
    Randomness is drawn from the given generator in this order: z, labels (if conditional), n.
    """

    name = "pid"

    def __init__(self, teacher: nn.Module, num_steps: int = 250, distance: DistanceConfig | str = "l2",
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                 device: torch.device | str | None = None):
        self.teacher = teacher
        self.num_steps = int(num_steps)
        lo, hi = default_sigma_range(teacher)
        self.sigma_min = float(sigma_min if sigma_min is not None else lo)
        self.sigma_max = float(sigma_max if sigma_max is not None else hi)
        self.rho = float(rho)
        self.distance_config = DistanceConfig(name=distance) if isinstance(distance, str) else distance
        self.distance = make_distance(self.distance_config, device)
        self.grid = karras_grid(self.num_steps, self.sigma_min, self.sigma_max, self.rho).float()

    def to(self, device: torch.device | str) -> "PIDObjective":
        """Move the teacher and the distance network (LPIPS) to `device` (the trainer calls this)."""
        self.teacher.to(device)
        if isinstance(self.distance, nn.Module):
            self.distance.to(device)
        return self

    def config_dict(self) -> dict:
        """JSON-able description; a resumed run must have the same one."""
        return {"name": self.name, "discretization": self.num_steps, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "rho": self.rho, "distance": vars(self.distance_config).copy()}

    def draw(self, batch_size: int, shape: tuple[int, int, int], label_dim: int, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """This micro-batch's randomness: z [B,C,H,W] (std σ_max), one-hot labels [B,K] or None, indices n [B]."""
        gdev = generator.device
        z = torch.randn((batch_size, *shape), generator=generator, device=gdev) * self.sigma_max
        labels = None
        if label_dim > 0:
            idx = torch.randint(label_dim, (batch_size,), generator=generator, device=gdev)
            labels = torch.eye(label_dim, device=gdev)[idx]
        n = torch.randint(self.num_steps, (batch_size,), generator=generator, device=gdev)
        return z.to(device), (labels.to(device) if labels is not None else None), n.to(device)

    def residual(self, student: nn.Module, z: torch.Tensor, labels: torch.Tensor | None,
                 n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs with gradient, detached teacher target), both [B,C,H,W], for given noise and grid indices."""
        grid = self.grid.to(z.device)
        t, t2 = grid[n], grid[pair_indices(n, self.num_steps)]
        both = student(torch.cat([z, z]), torch.cat([t, t2]),
                       None if labels is None else torch.cat([labels, labels]))
        x, x2 = both.float().chunk(2)
        t4, t24 = t.view(-1, 1, 1, 1), t2.view(-1, 1, 1, 1)
        lhs = x - t4 * (x - x2) / (t4 - t24)
        with torch.no_grad():
            rhs = self.teacher(x.detach(), t, labels).float()
        return lhs, rhs

    def loss(self, student: nn.Module, batch_size: int, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample PID losses [B] (with gradient) and logging stats."""
        shape = (student.img_channels, student.img_resolution, student.img_resolution)
        z, labels, n = self.draw(batch_size, shape, student.label_dim, generator, device)
        lhs, rhs = self.residual(student, z, labels, n)
        losses = self.distance(lhs, rhs)
        stats = {"residual_rms": (lhs.detach() - rhs).square().mean().sqrt()}  # a tensor: no GPU sync here
        return losses, stats
