"""The analytic teachers: exact denoiser (vs brute-force integration), limits, sampling, likelihood, ODE ends."""

import math

import pytest
import torch

from pid.exact_eval import exact_metrics, reference_endpoints
from pid.glyphs import glyph_means
from pid.toy import BUILTIN_TEACHERS, GaussianMixtureTeacher, builtin_teacher


def tiny_mixture(std=0.3) -> GaussianMixtureTeacher:
    """Four components in a 2-D data space ([C,H,W] = [1,1,2]), two classes, unequal weights."""
    means = torch.tensor([[-1.0, 0.5], [0.8, 0.9], [0.2, -1.1], [1.2, -0.4]], dtype=torch.float64)
    log_w = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64).log()
    return GaussianMixtureTeacher(means.reshape(4, 1, 1, 2), torch.tensor([0, 1, 0, 1]), std=std,
                                  log_weights=log_w, label_dim=2)


def brute_force_posterior_mean(teacher, y, sigma, class_idx=None, n=801, lim=4.5):
    """E[x | x + σn = y] by direct summation over a fine 2-D grid of the data density times the likelihood."""
    axis = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    mu = teacher.means.reshape(-1, 2)
    keep = torch.ones(len(mu), dtype=torch.bool) if class_idx is None else teacher.component_labels == class_idx
    s2 = teacher.std ** 2
    dens = sum(math.exp(teacher.log_weights[k]) * torch.exp(-((grid - mu[k]) ** 2).sum(1) / (2 * s2))
               for k in range(len(mu)) if keep[k])
    lik = torch.exp(-((grid - y) ** 2).sum(1) / (2 * sigma ** 2))
    w = dens * lik
    return (w[:, None] * grid).sum(0) / w.sum()


def test_denoiser_matches_brute_force_integration():
    teacher = tiny_mixture()
    ys = torch.tensor([[0.0, 0.0], [1.5, -2.0], [-0.7, 0.6], [0.9, 0.1]], dtype=torch.float64)
    for sigma in (0.2, 0.7, 2.0):
        got = teacher(ys.reshape(4, 1, 1, 2), sigma).reshape(4, 2)
        for i, y in enumerate(ys):
            assert torch.allclose(got[i], brute_force_posterior_mean(teacher, y, sigma), atol=1e-7)
        onehot = torch.eye(2, dtype=torch.float64)[[1, 0, 1, 0]]
        got = teacher(ys.reshape(4, 1, 1, 2), sigma, onehot).reshape(4, 2)
        for i, y in enumerate(ys):
            assert torch.allclose(got[i], brute_force_posterior_mean(teacher, y, sigma, [1, 0, 1, 0][i]), atol=1e-7)


def test_denoiser_limits():
    teacher = tiny_mixture()
    x = torch.randn(5, 1, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(teacher(x, 1e-9), x, atol=1e-12)  # σ→0: nothing to remove
    mean = (teacher.log_weights.exp()[:, None] * teacher.means.reshape(4, 2)).sum(0)
    assert torch.allclose(teacher(x * 1e6, 1e6).reshape(5, 2), mean.expand(5, 2), atol=1e-5)  # σ→∞: data mean
    cls1 = teacher.means.reshape(4, 2)[[1, 3]]
    w1 = torch.tensor([0.4, 0.3], dtype=torch.float64) / 0.7
    labels = torch.eye(2, dtype=torch.float64)[[1] * 5]
    assert torch.allclose(teacher(x * 1e6, 1e6, labels).reshape(5, 2), (w1[:, None] * cls1).sum(0).expand(5, 2),
                          atol=1e-5)
    zero_rows = torch.zeros(5, 2)  # "no label", as EDM's conditional nets receive it: the whole mixture
    assert torch.allclose(teacher(x, 0.7, zero_rows), teacher(x, 0.7), atol=1e-12)
    assert torch.allclose(teacher.log_prob(x, zero_rows), teacher.log_prob(x), atol=1e-12)


def test_denoiser_is_stable_and_keeps_dtype():
    teacher = builtin_teacher("glyphs16")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 80
    for sigma in (80.0, 1.0, 0.002, torch.tensor([80.0, 1.0, 0.002])):
        out = teacher(x, sigma)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    far = teacher(x.double() * 1e3, 0.002)  # huge distances: plain exp would underflow to 0/0
    assert torch.isfinite(far).all()


def test_exact_samples_have_mixture_statistics():
    teacher = tiny_mixture(std=0.1)  # well separated, so component_of recovers the drawn component
    gen = torch.Generator().manual_seed(0)
    n = 40000
    x = teacher.sample_data(n, generator=gen).reshape(n, 2)
    comp = teacher.component_of(x.reshape(n, 1, 1, 2))
    freq = torch.bincount(comp, minlength=4).double() / n
    assert torch.allclose(freq, teacher.log_weights.exp(), atol=0.01)
    mu = teacher.means.reshape(4, 2)
    for k in range(4):
        resid = x[comp == k] - mu[k]
        assert torch.allclose(resid.mean(0), torch.zeros(2, dtype=torch.float64), atol=0.01)
        assert resid.std() == pytest.approx(teacher.std, rel=0.03)
    labels = torch.eye(2)[[0] * 1000]
    xc = teacher.sample_data(1000, generator=gen, class_labels=labels)
    assert set(teacher.component_labels[teacher.component_of(xc)].tolist()) == {0}


def test_log_prob_is_a_normalized_density():
    teacher = tiny_mixture()
    axis = torch.linspace(-4.5, 4.5, 501, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 1, 1, 2)
    cell = float(axis[1] - axis[0]) ** 2
    assert float(teacher.log_prob(grid).exp().sum()) * cell == pytest.approx(1.0, abs=1e-6)
    for c in range(2):
        labels = torch.eye(2)[[c]]
        assert float(teacher.log_prob(grid, labels).exp().sum()) * cell == pytest.approx(1.0, abs=1e-6)


def test_builtin_teachers_are_deterministic_and_well_separated():
    for name, cfg in BUILTIN_TEACHERS.items():
        a, b = builtin_teacher(name), builtin_teacher(name)
        assert torch.equal(a.means, b.means) and torch.equal(a.component_labels, b.component_labels)
        res = cfg["resolution"]
        assert a.means.shape == (10 * cfg["per_class"], 3, res, res) and a.label_dim == 10
        assert (a.img_resolution, a.img_channels) == (res, 3)
        assert (a.sigma_min, a.sigma_max, a.sigma_data) == (0.002, 80.0, 0.5)
        assert float(a.means.min()) >= -1 and float(a.means.max()) <= 1
        assert torch.bincount(a.component_labels).tolist() == [cfg["per_class"]] * 10
        flat = a.means.flatten(1)
        dist = torch.cdist(flat, flat) + torch.eye(len(flat), dtype=torch.float64) * 1e9
        # nearest other mean is far beyond the spread of a component (std·sqrt(dim)); within a class (the
        # teachers are class-conditional) by 5x, across classes (components can share a background) by 3x
        spread = a.std * math.sqrt(flat.shape[1])
        same_class = a.component_labels[:, None] == a.component_labels[None, :]
        assert float(dist[same_class].min()) > 5 * spread and float(dist.min()) > 3 * spread
        assert torch.equal(a.component_of(a.means), torch.arange(len(flat)))
    with pytest.raises(Exception, match="glyphs32"):
        builtin_teacher("nope")


def test_glyphs_vary_within_a_class():
    means, labels = glyph_means(16, 3)
    assert labels == [c for c in range(10) for _ in range(3)]
    assert means.shape == (30, 3, 16, 16)
    # every glyph has a visible stroke: some pixels far from the background colour
    assert all(float(abs(m - m[:, :1, :1]).max()) > 0.5 for m in means)


def test_components_of_a_class_differ_in_low_frequencies():
    # The ODE's within-class choice should depend on coarse noise statistics: the difference of two components'
    # means must lie almost entirely in the per-channel constants (whole-image colour offsets), and be large.
    for res, per_class in [(16, 3), (32, 5)]:
        means, _ = glyph_means(res, per_class)
        means = means.reshape(10, per_class, 3, res, res)
        for c in range(10):
            for i in range(per_class):
                for j in range(i + 1, per_class):
                    d = means[c, i] - means[c, j]
                    coarse = d.mean(axis=(1, 2))
                    assert float((coarse ** 2).sum()) * res * res > 0.95 * float((d ** 2).sum())
                    assert float(abs(coarse).max()) > 0.5
        assert float(means.min()) >= -0.85 - 1e-12 and float(means.max()) <= 0.85 + 1e-12


def test_reference_endpoint_lands_on_a_component():
    teacher = builtin_teacher("glyphs16")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(8, 3, 16, 16, generator=gen)
    labels = torch.eye(10)[torch.arange(8)]
    ref = reference_endpoints(teacher, z, labels, num_steps=96)
    comp = teacher.component_of(ref, labels)
    assert torch.equal(teacher.component_labels[comp], torch.arange(8))  # on a component of the asked class
    rmse_to_mean = (ref - teacher.means[comp]).flatten(1).square().mean(1).sqrt()
    assert float(rmse_to_mean.max()) < 1.5 * teacher.std  # within the component's own spread
    finer = reference_endpoints(teacher, z, labels, num_steps=192)
    assert float((finer - ref).abs().max()) < 1e-3  # converged
    free = reference_endpoints(teacher, z[:4], None, num_steps=96)
    assert free.shape == (4, 3, 16, 16) and free.dtype == torch.float64


def test_exact_metrics():
    teacher = builtin_teacher("glyphs16")
    gen = torch.Generator().manual_seed(3)
    ref = teacher.sample_data(16, generator=gen)
    same = exact_metrics(teacher, ref, ref)
    assert same["rmse"] == 0 and same["component_accuracy"] == 1
    assert same["log_likelihood"] == pytest.approx(same["data_log_likelihood"], rel=0.05)
    noise = torch.rand(16, 3, 16, 16, generator=gen) * 2 - 1
    bad = exact_metrics(teacher, noise, ref)
    assert bad["rmse"] > 0.3 and bad["component_accuracy"] < 0.5
    assert bad["log_likelihood"] < same["log_likelihood"] - 1000
    assert set(bad) == {"rmse", "component_accuracy", "log_likelihood", "data_log_likelihood"}
