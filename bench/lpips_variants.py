"""Benchmark: how far each LPIPS variant is from the PID reference's LPIPS (piq, VGG16 with average pooling).

The reference computes `piq.LPIPS(replace_pooling=True)((x+1)/2, (y+1)/2)` after a bilinear resize to 224
(docs/pid.md §(c)). This script builds it offline with the same VGG16 and linear weights as ours (a random VGG16
written by `write_random_vgg16`, or torchvision's real file with --vgg; the `lpips` package's bundled linear
weights), then compares, per image pair, the loss and the gradient with respect to x for our `lpips_pool=avg`
and `lpips_pool=max`. Needs piq (`pip install piq`).

    python bench/lpips_variants.py                    # 32x32 and 64x64, 8 pairs each, random VGG16
    python bench/lpips_variants.py --vgg=vgg16-397923af.pth
"""

from __future__ import annotations

import os
import tempfile

import click
import torch
import torch.nn.functional as F


def build_piq(vgg_file: str, linear: list) -> torch.nn.Module:
    """piq's LPIPS(replace_pooling=True, reduction='none') with the given weights, without any download."""
    import piq
    import torchvision

    def vgg16(*args, **kwargs):
        net = torchvision.models.vgg16(weights=None)
        net.load_state_dict(torch.load(vgg_file, weights_only=True), strict=False)
        return net

    saved = piq.perceptual.vgg16, torch.hub.load_state_dict_from_url
    piq.perceptual.vgg16 = vgg16
    torch.hub.load_state_dict_from_url = lambda *a, **k: [w.clone() for w in linear]
    try:
        return piq.LPIPS(replace_pooling=True, reduction="none").eval()
    finally:
        piq.perceptual.vgg16, torch.hub.load_state_dict_from_url = saved


def reference(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's call: (x+1)/2 without clamp, bilinear resize to 224 below width 256."""
    x, y = (x + 1) / 2, (y + 1) / 2
    if x.shape[-1] < 256:
        x, y = F.interpolate(x, size=224, mode="bilinear"), F.interpolate(y, size=224, mode="bilinear")
    return model(x, y)


def pairs(n: int, size: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n smooth images in [-1, 1] and noisy copies (std `noise`), [n, 3, size, size] each."""
    g = torch.Generator().manual_seed(seed)
    y = F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g) * 2 - 1, size=size, mode="bilinear")
    return y + noise * torch.randn(y.shape, generator=g), y


def loss_and_grad(fn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    d = fn(x, y)
    d.sum().backward()
    return d.detach(), x.grad


@click.command()
@click.option("--vgg", default=None, help="torchvision VGG16 weights file  [default: random weights]")
@click.option("--num", type=int, default=8, help="Image pairs per configuration")
def main(vgg, num):
    """Print the markdown table of BENCHMARKS.md, 'LPIPS variants'."""
    from pid.distances import LPIPSDistance, write_random_vgg16
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        vgg_file = vgg or write_random_vgg16(os.path.join(tmp, "vgg16.pth"))
        ours = {pool: LPIPSDistance(224, vgg_file, pool=pool) for pool in ("avg", "max")}
        linear = [lin.model[1].weight.detach().clone() for lin in ours["avg"].model.lins]
        ref = build_piq(vgg_file, linear)
    print(f"VGG16: {'file ' + os.path.basename(vgg) if vgg else 'random (write_random_vgg16)'}; {num} pairs each\n")
    print("| images | noise | variant | loss rel. diff, max | loss rel. diff, mean | gradient rel. diff |")
    print("|---|---|---|---|---|---|")
    for size in (32, 64):
        for noise in (0.3, 0.03):
            x, y = pairs(num, size, noise, seed=size)
            d_ref, g_ref = loss_and_grad(lambda a, b: reference(ref, a, b), x, y)
            for pool in ("avg", "max"):
                d, g = loss_and_grad(ours[pool], x, y)
                rel = (d - d_ref).abs() / d_ref
                grad = ((g - g_ref).norm() / g_ref.norm()).item()
                print(f"| {size}×{size} | {noise} | {pool} | {rel.max():.1e} | {rel.mean():.1e} | {grad:.1e} |")


if __name__ == "__main__":
    main()
