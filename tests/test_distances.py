"""LPIPS variants against their originals, offline: the average-pooled variant (`lpips_pool='avg'`) equals the
PID reference's `piq.LPIPS(replace_pooling=True)` applied as the reference applies it ((x+1)/2, bilinear resize to
224), loss and input gradient, and the max-pooled variant equals the `lpips` package. Both sides get the same
random VGG16 (written by the test) and the `lpips` package's bundled linear weights: nothing is downloaded."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from pid.distances import DistanceConfig, LPIPSDistance, make_distance, write_random_vgg16
from pid.errors import ConfigError


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    return write_random_vgg16(tmp_path_factory.mktemp("vgg") / "vgg16.pth", seed=3)


def piq_lpips(vgg_file: str, linear: list, monkeypatch) -> torch.nn.Module:
    """piq's LPIPS(replace_pooling=True) built without network access: torchvision's VGG16 gets the test's
    weights and the hub download of piq's linear-weight file returns `linear` ([1, C, 1, 1] tensors)."""
    piq = pytest.importorskip("piq")
    import torchvision

    def vgg16(*args, **kwargs):
        net = torchvision.models.vgg16(weights=None)
        net.load_state_dict(torch.load(vgg_file, weights_only=True), strict=False)
        return net

    monkeypatch.setattr(piq.perceptual, "vgg16", vgg16)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: [w.clone() for w in linear])
    return piq.LPIPS(replace_pooling=True, reduction="none").eval()


def reference_distance(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The PID reference's call (docs/pid.md §(c)): (x+1)/2 without clamping, bilinear to 224 below width 256."""
    x, y = (x + 1) / 2, (y + 1) / 2
    if x.shape[-1] < 256:
        x, y = F.interpolate(x, size=224, mode="bilinear"), F.interpolate(y, size=224, mode="bilinear")
    return model(x, y)


def images(seed: int, n: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair of image batches in [-1, 1] (a smooth image and a noisy copy, a little outside the range as a
    student's output can be), [n, 3, size, size] each."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear")
    return base, base + 0.3 * torch.randn(base.shape, generator=g)


def linear_weights(ours: LPIPSDistance) -> list:
    return [lin.model[1].weight.detach().clone() for lin in ours.model.lins]


def test_avg_pool_lpips_matches_the_reference_piq(vgg_file, monkeypatch):
    ours = LPIPSDistance(resize=224, vgg_path=vgg_file, pool="avg")
    ref = piq_lpips(vgg_file, linear_weights(ours), monkeypatch)
    x, y = images(0)
    xo, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    d_ours, d_ref = ours(xo, y), reference_distance(ref, xr, y)
    d_ours.sum().backward()
    d_ref.sum().backward()
    assert d_ours.shape == d_ref.shape == (2,) and bool((d_ref > 0).all())
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-4 * xr.grad.abs().max().item())
    # The max-pooled variant is a different objective: far from the reference on the same inputs.
    d_max = LPIPSDistance(resize=224, vgg_path=vgg_file, pool="max")(x, y)
    assert ((d_max - d_ref).abs() / d_ref).min() > 1e-2


def test_max_pool_lpips_matches_the_lpips_package(vgg_file):
    import lpips
    ours = LPIPSDistance(resize=0, vgg_path=vgg_file, pool="max")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pkg = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    sd = torch.load(vgg_file, weights_only=True)
    for slice_ in (pkg.net.slice1, pkg.net.slice2, pkg.net.slice3, pkg.net.slice4, pkg.net.slice5):
        for name, layer in slice_.named_children():
            if isinstance(layer, torch.nn.Conv2d):
                layer.weight.data.copy_(sd[f"features.{name}.weight"])
                layer.bias.data.copy_(sd[f"features.{name}.bias"])
    x, y = images(1, size=32)
    torch.testing.assert_close(ours(x, y), pkg(x, y).flatten(), rtol=1e-6, atol=0)


def test_lpips_pool_option(vgg_file):
    assert DistanceConfig("lpips").lpips_pool == "avg"   # the reference's LPIPS unless asked otherwise
    dist = make_distance(DistanceConfig("lpips", lpips_resize=0, lpips_vgg=vgg_file, lpips_pool="max"))
    assert dist.pool == "max" and not any(isinstance(m, torch.nn.AvgPool2d) for m in dist.modules())
    avg = make_distance(DistanceConfig("lpips", lpips_resize=0, lpips_vgg=vgg_file))
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in avg.modules()) == 4
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in avg.modules())
    with pytest.raises(ConfigError, match="--lpips-pool"):
        LPIPSDistance(vgg_path=vgg_file, pool="min")
