"""Train a network teacher of a built-in mixture by denoising score matching and write it as an EDM network pickle.

    python -m pid.make_teacher --data=builtin:glyphs16 --out=pid/assets/glyphs16-net.pkl

The result is an ordinary EDM network pickle (`EDMPrecond` over a small class-conditional `DhariwalUNet`, written by
`edm_networks.pickle_writer` in EDM's persistence format) that loads through `load_network_pickle` exactly as a
user's `edm-*.pkl` does. It is trained as EDM trains its teachers (EDM's loss: ln σ ~ N(P_mean, P_std²), weight
λ(σ) = (σ² + σ_data²)/(σ·σ_data)², Adam, an EMA of the weights), on fresh exact samples of the mixture at every
step, so its errors are those of a real network that learned from data: it never sees the exact denoiser.
`builtin:glyphs16-net` is the file this command wrote with its defaults (sha256 in `pid/assets/SHA256SUMS`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from typing import Optional

import torch

__all__ = ["TEACHER_NETWORKS", "build_teacher_network", "train_teacher", "denoiser_error", "write_teacher", "main"]

# Architectures of the shipped network teachers: EDMPrecond kwargs without the image and label sizes. The glyph
# students' ADM U-Net (16 base channels, blocks down to 2x2, 0.47M parameters): measured on 1 CPU thread, a
# training step at batch 128 took 0.36 s against 1.13 s with 32 channels, and every PID/MM step calls the teacher
# and trains a copy of it, so its size sets the cost of every distillation run on it.
TEACHER_NETWORKS = {
    "glyphs16": dict(model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                     num_blocks=1, attn_resolutions=[], dropout=0.0),
}


def build_teacher_network(arch: dict, resolution: int, channels: int, label_dim: int, sigma_data: float = 0.5,
                          seed: int = 0) -> torch.nn.Module:
    """A randomly initialised EDMPrecond (init drawn from `seed`, the global RNG left as it was)."""
    from edm_networks import EDMPrecond
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDMPrecond(img_resolution=resolution, img_channels=channels, label_dim=label_dim,
                          sigma_data=sigma_data, **copy.deepcopy(arch))


@torch.no_grad()
def denoiser_error(net: torch.nn.Module, mixture, sigmas=(0.02, 0.1, 0.5, 2.0, 10.0), num: int = 500,
                   seed: int = 12345) -> dict:
    """Per σ: the RMS per pixel of D_net(x; σ) − D_exact(x; σ) over `num` noisy exact samples x = y + σn
    (`rms_error`), and beside it the RMS of x − D_exact(x; σ) (`rms_correction`, what the denoiser has to remove).
    """
    gen = torch.Generator().manual_seed(seed)
    labels_idx = torch.randint(0, mixture.label_dim, (num,), generator=gen)
    labels = torch.nn.functional.one_hot(labels_idx, mixture.label_dim).to(torch.float64)
    y = mixture.sample_data(num, generator=gen, class_labels=labels)
    out = {}
    for sigma in sigmas:
        x = y + sigma * torch.randn(y.shape, generator=gen, dtype=torch.float64)
        exact = mixture(x, sigma, labels)
        got = net(x.float(), torch.full([num], float(sigma)), labels.float()).to(torch.float64)
        out[f"{sigma:g}"] = dict(rms_error=float((got - exact).square().mean().sqrt()),
                                 rms_correction=float((x - exact).square().mean().sqrt()))
    return out


def train_teacher(mixture, arch: dict, *, steps: int = 5000, batch: int = 64, lr: float = 2e-3,
                  ema_halflife_steps: float = 200.0, warmup: int = 200, p_mean: float = -1.2, p_std: float = 1.2,
                  sigma_data: float = 0.5, seed: int = 0, progress: bool = True, log=print) -> torch.nn.Module:
    """EDM's denoising score matching on fresh exact samples of `mixture`; returns the EMA network (eval, frozen).

    Adam (β 0.9/0.999) with a linear warm-up and a cosine decay to 0; the EMA's half-life is in steps, as
    EDM's ema_halflife_kimg. Every draw comes from one generator seeded with `seed`, so the run is reproducible
    on a given machine and torch build.
    """
    from tqdm import tqdm
    net = build_teacher_network(arch, mixture.img_resolution, mixture.img_channels, mixture.label_dim,
                                sigma_data, seed).train().requires_grad_(True)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(seed + 1)
    beta = 0.5 ** (1.0 / max(ema_halflife_steps, 1e-8))
    bar = tqdm(range(steps), unit="step", dynamic_ncols=True, disable=not progress)
    window, t0 = [], time.time()
    for step in bar:
        idx = torch.randint(0, mixture.label_dim, (batch,), generator=gen)
        labels = torch.nn.functional.one_hot(idx, mixture.label_dim).to(torch.float64)
        y = mixture.sample_data(batch, generator=gen, class_labels=labels).float()
        sigma = (torch.randn([batch, 1, 1, 1], generator=gen) * p_std + p_mean).exp()
        n = torch.randn(y.shape, generator=gen) * sigma
        weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
        loss = (weight * (net(y + n, sigma, labels.float()) - y).square()).mean()
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1 - beta)
        window.append(float(loss))
        if (step + 1) % 100 == 0:
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            if not progress:
                log(f"step {step + 1}/{steps} loss {sum(window) / len(window):.4f} ({time.time() - t0:.0f} s)")
            window = []
    return ema


def write_teacher(net: torch.nn.Module, path: str) -> str:
    """Write `net` as an EDM network-snapshot pickle at `path` (atomically); return its sha256."""
    from edm_networks.pickle_writer import dump, snapshot
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        dump(snapshot(net, augment=False), f)
    os.replace(tmp, path)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv: Optional[list] = None) -> None:
    import argparse
    from pid.toy import builtin_teacher
    parser = argparse.ArgumentParser(prog="python -m pid.make_teacher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="builtin:glyphs16", help="built-in mixture to learn [builtin:glyphs16]")
    parser.add_argument("--out", required=True, help="output .pkl")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema-halflife", type=float, default=200.0, help="EMA half-life in steps [200]")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args(argv)
    name = opts.data.removeprefix("builtin:")
    if name not in TEACHER_NETWORKS:
        parser.error(f"no network architecture for {opts.data}; choose one of "
                     + ", ".join(f"builtin:{k}" for k in TEACHER_NETWORKS))
    mixture = builtin_teacher(name)
    t0 = time.time()
    net = train_teacher(mixture, TEACHER_NETWORKS[name], steps=opts.steps, batch=opts.batch, lr=opts.lr,
                        ema_halflife_steps=opts.ema_halflife, seed=opts.seed)
    seconds = time.time() - t0
    digest = write_teacher(net, opts.out)
    report = dict(out=opts.out, sha256=digest, seconds=round(seconds, 1), threads=torch.get_num_threads(),
                  parameters=sum(p.numel() for p in net.parameters()), torch=torch.__version__,
                  settings=vars(opts), denoiser_error=denoiser_error(net, mixture))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
