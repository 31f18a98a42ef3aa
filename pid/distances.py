"""Image distances used by the distillation objectives.

Distances `l2`, `l1`, `pseudo-huber` and `lpips` (VGG) map two image batches in [-1, 1] of shape [B, C, H, W]
to per-sample distances [B] (float32). LPIPS is imported lazily so that `import pid` stays light.

LPIPS comes in two variants that differ only in VGG16's pooling (`lpips_pool`):
  avg  the PID reference's: piq's `LPIPS(replace_pooling=True)`, every MaxPool2d of VGG16 replaced by an
       AvgPool2d(2, 2). piq's input mapping ((x+1)/2, then ImageNet mean/std) is the same affine map as the
       `lpips` package's scaling layer (shift 2·mean − 1, scale 2·std), and its per-layer channel normalisation,
       squared difference, linear weights, spatial mean and sum over layers are those of LPIPS v0.1.
  max  the `lpips` package's LPIPS (VGG16 as trained, max pooling).
The two give different losses and gradients (BENCHMARKS.md, PID (d)).
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

from pid.errors import CheckpointError, ConfigError, DownloadError

__all__ = ["DistanceConfig", "DISTANCES", "LPIPS_POOLS", "make_distance", "LPIPSDistance", "load_vgg16_features",
           "write_random_vgg16", "l2_distance", "l1_distance", "pseudo_huber_distance"]

DISTANCES = ("lpips", "l2", "l1", "pseudo-huber")
LPIPS_POOLS = ("avg", "max")
Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DistanceConfig:
    """Which distance to use and its knobs.

    name: one of DISTANCES. huber_c: pseudo-Huber c; None → 0.00054·sqrt(C·H·W) (the value used by improved
    consistency training, scaled with the image size). lpips_resize: side length images are bilinearly resized to
    before LPIPS (224 as the reference; 0 = no resize). lpips_vgg: path of a torchvision VGG16 state dict
    (`vgg16-397923af.pth`); None → torchvision's cache, downloading it if possible. lpips_pool: VGG16's pooling,
    'avg' (the PID reference's LPIPS, piq with replace_pooling=True) or 'max' (the `lpips` package's).
    """
    name: str = "l2"
    huber_c: float | None = None
    lpips_resize: int = 224
    lpips_vgg: str | None = None
    lpips_pool: str = "avg"


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
        return _read_vgg16(target)
    if path is not None:
        raise DownloadError(f"VGG16 weights file not found: {path}. Pass the path of torchvision's "
                            f"vgg16-397923af.pth (--lpips-vgg), or choose another distance "
                            f"(--loss=l2|l1|pseudo-huber).")
    reason = ""
    if download:
        import torchvision
        from pid.download import download_lock
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with download_lock(target):   # a torchrun job's ranks: one downloads, the others read its file
                if not os.path.isfile(target):
                    return torchvision.models.VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as exc:  # offline, proxy, ... all mean the same thing to the user
            reason = f" ({type(exc).__name__}: {exc})"
        if not reason:   # another process fetched it while this one waited
            return _read_vgg16(target)
    url = __import__("torchvision").models.VGG16_Weights.IMAGENET1K_V1.url
    raise DownloadError(f"LPIPS needs torchvision's ImageNet VGG16 weights, which are not in the cache {target} and "
                        f"could not be downloaded{reason}. Download {url} to that path (or pass its location with "
                        f"--lpips-vgg), or choose a distance that needs no download (--loss=l2|l1|pseudo-huber).")


def _read_vgg16(path: str) -> dict[str, torch.Tensor]:
    """torch.load a VGG16 state dict (weights_only) and check its conv layers; CheckpointError otherwise."""
    fix = ("give torchvision's vgg16-397923af.pth (--lpips-vgg), or choose another distance "
           "(--loss=l2|l1|pseudo-huber)")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # random bytes, a truncated zip, a foreign pickle: all "not the weights file"
        raise CheckpointError(f"VGG16 weights file {path} is corrupt or not a torch file "
                              f"({type(exc).__name__}); {fix}.") from None
    problems = [] if isinstance(sd, dict) else [f"it holds a {type(sd).__name__}, not a state dict"]
    cins = [3] + [cout for _, cout in _VGG16_CONVS[:-1]]   # each conv reads what the previous one wrote
    for (i, cout), cin in zip(_VGG16_CONVS, cins) if not problems else ():
        for name, shape in ((f"features.{i}.weight", (cout, cin, 3, 3)), (f"features.{i}.bias", (cout,))):
            value = sd.get(name)
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                problems.append(f"{name} is missing or not of shape {list(shape)}")
    if problems:
        raise CheckpointError(f"VGG16 weights file {path} is not torchvision's VGG16 ({len(problems)} problems, "
                              f"e.g. {problems[0]}); {fix}.")
    return sd


class LPIPSDistance(nn.Module):
    """LPIPS (VGG16 backbone, linear layers v0.1 of the `lpips` package) on images in [-1, 1].

    pool='avg' is the PID reference's variant (piq, replace_pooling=True), pool='max' the `lpips` package's (see
    the module docstring). Images smaller than `resize` are bilinearly upsampled to resize×resize first, as the
    PID reference does (resize=0 keeps the native size). The backbone and linear weights are frozen.
    """

    def __init__(self, resize: int = 224, vgg_path: str | None = None, download: bool = True, pool: str = "avg"):
        super().__init__()
        if pool not in LPIPS_POOLS:
            raise ConfigError(f"unknown --lpips-pool={pool!r}; choose avg (the PID reference's) or max (the lpips "
                              f"package's)")
        import lpips  # heavy: imported only when LPIPS is actually requested
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)  # random VGG: no download here
        self._load_backbone(load_vgg16_features(vgg_path, download))
        if pool == "avg":
            self._average_pooling()
        self.model.eval().requires_grad_(False)
        self.resize, self.pool = int(resize), pool

    def _average_pooling(self) -> None:
        # Each of slices 2..5 starts with VGG16's 2×2 stride-2 max pool (features.4, 9, 16, 23); the reference
        # averages instead. pool5 (features.30) follows the last LPIPS layer and is not part of the model.
        for slice_ in (self.model.net.slice2, self.model.net.slice3, self.model.net.slice4, self.model.net.slice5):
            for name, layer in list(slice_.named_children()):
                if isinstance(layer, nn.MaxPool2d):
                    setattr(slice_, name, nn.AvgPool2d(kernel_size=2, stride=2))

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
        return LPIPSDistance(config.lpips_resize, config.lpips_vgg, pool=config.lpips_pool).to(device or "cpu")
    raise ConfigError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")
