"""Student network descriptions: named presets for teachers without a network, and specs of copied teacher nets.

A network spec is `{'class': 'SongUNet' | 'DhariwalUNet', 'kwargs': {...}}`: JSON-able, enough to rebuild the
U-Net (random weights) with `build_network`. Presets are small U-Nets sized for the built-in glyph teachers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pid.errors import CheckpointError, ConfigError

__all__ = ["PRESETS", "build_network", "build_preset_network", "network_spec", "disable_dropout"]

NETWORK_CLASSES = ("SongUNet", "DhariwalUNet")

# DDPM++-style SongUNets (positional embedding, standard encoder/decoder), no dropout.
_DDPMPP = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
           "channel_mult_noise": 1, "resample_filter": [1, 1], "dropout": 0.0}
# A preset is a network spec without the image/label sizes: {'class': ..., 'kwargs': ...}.
PRESETS: dict[str, dict] = {
    "tiny": {"class": "SongUNet",
             "kwargs": {**_DDPMPP, "model_channels": 16, "channel_mult": [1, 2], "channel_mult_emb": 2,
                        "num_blocks": 1, "attn_resolutions": []}},
    # The built-in glyph teachers' students: small ADM U-Nets (EDM's DhariwalUNet) down to 2x2 (4x4 at 32 px), so
    # that the deepest features see the whole image: which mixture component the ODE ends on is a global function
    # of the noise. ADM's blocks modulate each block by the noise level with a scale and a shift after the
    # normalisation (DDPM++ only adds a shift before it) and start as the identity (zero-initialised last conv);
    # with the same widths the default PID run learned faster, at no dearer steps (no attention: 32 channels are
    # fewer than ADM's 64 per head). BENCHMARKS.md, PID (a), compares the two on glyphs16; glyphs32 follows suit
    # untested in training.
    "glyphs16": {"class": "DhariwalUNet",
                 "kwargs": {"model_channels": 16, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
                            "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
    "glyphs32": {"class": "DhariwalUNet",
                 "kwargs": {"model_channels": 16, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
                            "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
    # `glyphs16` with 24 base channels (1.04 M parameters, 1.8x the step time): measured no better at equal steps
    # (BENCHMARKS.md, "PID on the analytic teacher").
    "glyphs16-w24": {"class": "DhariwalUNet",
                     "kwargs": {"model_channels": 24, "channel_mult": [1, 2, 2, 2], "channel_mult_emb": 4,
                                "num_blocks": 1, "attn_resolutions": [], "dropout": 0.0}},
    # The previous glyph presets (DDPM++ SongUNets with attention at the deepest level), kept for comparison.
    "glyphs16-ddpmpp": {"class": "SongUNet",
                        "kwargs": {**_DDPMPP, "model_channels": 16, "channel_mult": [1, 2, 2, 2],
                                   "channel_mult_emb": 4, "num_blocks": 1, "attn_resolutions": [2]}},
    "glyphs32-ddpmpp": {"class": "SongUNet",
                        "kwargs": {**_DDPMPP, "model_channels": 16, "channel_mult": [1, 2, 2, 2],
                                   "channel_mult_emb": 4, "num_blocks": 1, "attn_resolutions": [4]}},
}

# Constructor parameters of the preconditioners that are not U-Net kwargs (edm.md §3).
_PRECOND_ONLY = {"img_resolution", "img_channels", "label_dim", "use_fp16", "model_type", "sigma_min", "sigma_max",
                 "sigma_data", "beta_d", "beta_min", "M", "epsilon_t", "C_1", "C_2"}
_DEFAULT_MODEL = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet",
                  "iDDPMPrecond": "DhariwalUNet"}


def build_network(spec: dict) -> nn.Module:
    """Rebuild a U-Net from `{'class', 'kwargs'}` (random weights; the caller loads a state dict)."""
    import edm_networks
    cls = spec.get("class") if isinstance(spec, dict) else None
    if cls not in NETWORK_CLASSES:
        raise CheckpointError(f"unknown student network class {cls!r}; expected one of {', '.join(NETWORK_CLASSES)}")
    return getattr(edm_networks, cls)(**copy.deepcopy(spec["kwargs"]))


def build_preset_network(name: str, img_resolution: int, img_channels: int, label_dim: int,
                         seed: int = 0) -> tuple[nn.Module, dict]:
    """A randomly initialised preset U-Net (init drawn from `seed`, global RNG untouched) and its spec."""
    if name not in PRESETS:
        raise ConfigError(f"unknown student preset {name!r}; choose one of {', '.join(PRESETS)}")
    kwargs = {"img_resolution": int(img_resolution), "in_channels": int(img_channels),
              "out_channels": int(img_channels), "label_dim": int(label_dim), **copy.deepcopy(PRESETS[name]["kwargs"])}
    spec = {"class": PRESETS[name]["class"], "kwargs": kwargs, "preset": name}
    with torch.random.fork_rng(devices=[]):  # EDM layers draw their init from the global RNG
        torch.manual_seed(seed)
        net = build_network(spec)
    return net, spec


def network_spec(precond: nn.Module) -> dict:
    """Spec of `precond.model` (an EDM U-Net inside a preconditioner), with dropout switched off as the reference."""
    model = precond.model
    kwargs = getattr(model, "init_kwargs", None)
    if kwargs is None:  # derive the U-Net kwargs from the preconditioner's, as EDM's constructors do
        pk = dict(getattr(precond, "init_kwargs", {}))
        if not pk:
            raise ConfigError(f"cannot describe the teacher network {type(model).__name__}: no init_kwargs")
        kwargs = {k: v for k, v in pk.items() if k not in _PRECOND_ONLY}
        kwargs.update(img_resolution=pk["img_resolution"], in_channels=pk["img_channels"],
                      out_channels=pk["img_channels"] * (2 if type(precond).__name__ == "iDDPMPrecond" else 1),
                      label_dim=pk.get("label_dim", 0))
    kwargs = copy.deepcopy(dict(kwargs))
    kwargs["dropout"] = 0.0
    kwargs["label_dropout"] = 0.0
    return {"class": type(model).__name__, "kwargs": kwargs}


def disable_dropout(net: nn.Module) -> None:
    """Switch off dropout (and EDM's label dropout) in every layer: distillation trains without it (PID reference)."""
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "label_dropout"):
            if isinstance(getattr(m, attr, None), (int, float)):
                setattr(m, attr, 0)
