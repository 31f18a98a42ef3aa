"""The released EDM network configurations by name (``docs/edm.md`` §4), for building a network without a pickle.

Each preset is the exact constructor call EDM's ``train.py`` made for the released ``edm-*.pkl`` files
(same kwargs, same key order as the pickles' ``ema._init_kwargs``), so a preset network has the released
state_dict keys and shapes and can load their weights. All released models use ``EDMPrecond``; "vp"/"ve" in
a name is the architecture (DDPM++ / NCSN++), not the preconditioner. Two ``train-*`` presets give EDM's
VP- and VE-preconditioned CIFAR-10 training configurations.

    >>> list_presets()[:2]
    ['edm-afhqv2-64x64-uncond-ve', 'edm-afhqv2-64x64-uncond-vp']
    >>> net = build_preset('edm-cifar10-32x32-cond-vp')           # random init, 55.7M parameters
    >>> tiny = build_preset('edm-cifar10-32x32-cond-vp', model_channels=16, channel_mult=[1, 2])
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch

from .classes import PRECOND_CLASSES

__all__ = ["PRESETS", "list_presets", "preset_kwargs", "build_preset"]

# train.py --arch settings (docs/edm.md §4.1), in the key order they take in the pickles.
_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
               channel_mult_noise=1, resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2])
_NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual", decoder_type="standard",
               channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128, channel_mult=[2, 2, 2])
_ADM = dict(model_type="DhariwalUNet", model_channels=192, channel_mult=[1, 2, 3, 4])


def _config(arch: dict, resolution: int, label_dim: int, dropout: float, augment: bool = True,
            use_fp16: bool = False, channel_mult: Optional[list] = None) -> dict:
    """Constructor kwargs in train.py's order: arch, overrides, augment_dim, dropout, use_fp16, dataset facts."""
    kwargs = copy.deepcopy(arch)
    if channel_mult is not None:
        kwargs["channel_mult"] = channel_mult  # --cres overwrites in place, keeping the key position
    if augment:
        kwargs["augment_dim"] = 9
    kwargs.update(dropout=dropout, use_fp16=use_fp16, img_resolution=resolution, img_channels=3, label_dim=label_dim)
    return kwargs


_WIDE = [1, 2, 2, 2]  # --cres=1,2,2,2 used for the 64x64 SongUNet models

PRESETS: dict = {
    "edm-cifar10-32x32-cond-vp": ("EDMPrecond", _config(_DDPMPP, 32, 10, 0.13)),
    "edm-cifar10-32x32-cond-ve": ("EDMPrecond", _config(_NCSNPP, 32, 10, 0.13)),
    "edm-cifar10-32x32-uncond-vp": ("EDMPrecond", _config(_DDPMPP, 32, 0, 0.13)),
    "edm-cifar10-32x32-uncond-ve": ("EDMPrecond", _config(_NCSNPP, 32, 0, 0.13)),
    "edm-ffhq-64x64-uncond-vp": ("EDMPrecond", _config(_DDPMPP, 64, 0, 0.05, channel_mult=_WIDE)),
    "edm-ffhq-64x64-uncond-ve": ("EDMPrecond", _config(_NCSNPP, 64, 0, 0.05, channel_mult=_WIDE)),
    "edm-afhqv2-64x64-uncond-vp": ("EDMPrecond", _config(_DDPMPP, 64, 0, 0.25, channel_mult=_WIDE)),
    "edm-afhqv2-64x64-uncond-ve": ("EDMPrecond", _config(_NCSNPP, 64, 0, 0.25, channel_mult=_WIDE)),
    "edm-imagenet-64x64-cond-adm": ("EDMPrecond", _config(_ADM, 64, 1000, 0.10, augment=False, use_fp16=True)),
    "train-cifar10-32x32-cond-ddpmpp-vp": ("VPPrecond", _config(_DDPMPP, 32, 10, 0.13)),
    "train-cifar10-32x32-cond-ncsnpp-ve": ("VEPrecond", _config(_NCSNPP, 32, 10, 0.13)),
}


def list_presets() -> list:
    """Names of all presets, sorted."""
    return sorted(PRESETS)


def _lookup(name: str) -> tuple:
    if name not in PRESETS:
        raise ValueError(f'unknown network preset "{name}"; valid presets: {", ".join(list_presets())}')
    return PRESETS[name]


def preset_kwargs(name: str) -> dict:
    """``{'class_name': <preconditioner class name>, 'kwargs': <constructor kwargs>}`` (a fresh copy).

    Raises ValueError naming the valid presets when ``name`` is unknown.
    """
    class_name, kwargs = _lookup(name)
    return {"class_name": class_name, "kwargs": copy.deepcopy(kwargs)}


def build_preset(name: str, *, device: Optional[Union[str, torch.device]] = None, **overrides: Any) -> torch.nn.Module:
    """Build the preset's preconditioner with random (EDM) initialisation from torch's global RNG.

    ``overrides`` replace constructor kwargs (e.g. ``model_channels=16`` for a small test network, or
    ``dropout=0``). ``device='meta'`` builds shapes only, instantly (no memory, no RNG draws).
    """
    info = preset_kwargs(name)
    kwargs = {**info["kwargs"], **overrides}
    cls = PRECOND_CLASSES[info["class_name"]]
    if device is None:
        return cls(**kwargs)
    with torch.device(device):
        return cls(**kwargs)
