"""pid.exact_eval's distribution metrics: exact target moments, and scores of exact data vs a collapsed sampler."""

import pytest
import torch

from pid.exact_eval import component_weights, distribution_metrics, mixture_moments, target_moments
from pid.toy import GaussianMixtureTeacher, builtin_teacher


def unequal_mixture() -> GaussianMixtureTeacher:
    """Six components in 3x4x4 pixels, three classes whose total weights are far from uniform (0.1, 0.3, 0.6)."""
    g = torch.Generator().manual_seed(1)
    means = torch.rand([6, 3, 4, 4], generator=g, dtype=torch.float64) * 2 - 1
    weights = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.2, 0.4], dtype=torch.float64)
    return GaussianMixtureTeacher(means, torch.tensor([0, 0, 1, 1, 2, 2]), std=0.1, log_weights=weights.log(),
                                  label_dim=3)


def uniform_labels(n: int, label_dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.eye(label_dim, dtype=torch.float64)[torch.randint(label_dim, [n], generator=g)]


def assert_moments_match(data: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample moments of data [n,...] equal (mean, cov) within tolerances derived from n.

    Mean: E‖m̂ − m‖² ≤ tr(Σ)/n (equal for iid rows; labels fixed per row only lower it); allow 3x. Covariance:
    Σ̂ is an average of n terms (x−m)(x−m)ᵀ, so E‖Σ̂ − Σ‖²_F ≈ E‖(x−m)(x−m)ᵀ − Σ‖²_F / n
    = (E‖y‖⁴ − 2E yᵀΣy + ‖Σ‖²_F)/n with y = x − m, estimated from the same rows; allow 3x.
    """
    flat = data.reshape(data.shape[0], -1)
    n = flat.shape[0]
    y = flat - mean
    err_mean = (flat.mean(0) - mean).square().sum()
    assert err_mean < 3 * cov.trace() / n
    var_cov = ((y.square().sum(1) ** 2).mean() - 2 * ((y @ cov) * y).sum(1).mean() + cov.square().sum()) / n
    err_cov = (torch.cov(flat.T) - cov).square().sum()
    assert err_cov < 3 * var_cov
    assert 3 * var_cov < 1e-2 * cov.square().sum()  # the check is not vacuous


def test_closed_form_moments_match_monte_carlo():
    teacher = unequal_mixture()
    n = 20000
    mean, cov = mixture_moments(teacher)
    assert mean.shape == (48,) and cov.shape == (48, 48) and mean.dtype == cov.dtype == torch.float64
    assert_moments_match(teacher.sample_data(n, generator=torch.Generator().manual_seed(2)), mean, cov)
    # labels drawn uniformly over classes: the target is the average of p(x | label_i), not p(x)
    labels = uniform_labels(n, 3, seed=3)
    w = component_weights(teacher, labels)
    per_class = torch.tensor([0.5, 0.5, 1 / 3, 2 / 3, 1 / 3, 2 / 3], dtype=torch.float64)
    torch.testing.assert_close(w, per_class * labels.mean(0)[teacher.component_labels], rtol=1e-12, atol=0)
    t_mean, t_cov = target_moments(teacher, labels)
    data = teacher.sample_data(n, generator=torch.Generator().manual_seed(4), class_labels=labels)
    assert_moments_match(data, t_mean, t_cov)
    assert (t_mean - mean).square().sum() > 30 * cov.trace() / n  # the two targets are told apart at this n


def test_exact_data_scores_the_floor():
    teacher = unequal_mixture()
    n = 4000
    labels = uniform_labels(n, 3, seed=5)
    data = teacher.sample_data(n, generator=torch.Generator().manual_seed(6), class_labels=labels)
    m = distribution_metrics(teacher, data, labels)
    assert set(m) == {"fd_exact", "component_tv", "rms_to_mean", "data_fd_exact", "data_component_tv",
                      "data_rms_to_mean"}
    w = component_weights(teacher, labels)
    tv_scale = 0.5 * (w * (1 - w) / n).sqrt().sum()  # ≥ E[TV] of n multinomial draws (Jensen)
    for prefix in ("", "data_"):
        assert m[prefix + "component_tv"] < 3 * tv_scale < 0.06
        assert m[prefix + "rms_to_mean"] == pytest.approx(teacher.std, rel=0.01)
        assert m[prefix + "fd_exact"] < 0.05 * mixture_moments(teacher)[1].trace()
    assert 1 / 3 < m["fd_exact"] / m["data_fd_exact"] < 3  # both are sampling error at the same n


def test_collapsed_sampler_scores_badly():
    teacher = unequal_mixture()
    labels = uniform_labels(1000, 3, seed=7)
    collapsed = teacher.means[4].expand(1000, -1, -1, -1).clone()
    m = distribution_metrics(teacher, collapsed, labels)
    assert m["fd_exact"] > 0.5 * target_moments(teacher, labels)[1].trace() > 20 * m["data_fd_exact"]
    assert m["component_tv"] > 0.5 and m["data_component_tv"] < 0.05
    assert m["rms_to_mean"] < 1e-6 and m["data_rms_to_mean"] == pytest.approx(teacher.std, rel=0.02)


def test_metrics_are_invariant_to_image_order():
    teacher = unequal_mixture()
    labels = uniform_labels(300, 3, seed=8)
    images = teacher.sample_data(300, generator=torch.Generator().manual_seed(9), class_labels=labels)
    images = images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(10),
                                          dtype=torch.float64)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(11))
    a = distribution_metrics(teacher, images, labels)
    b = distribution_metrics(teacher, images[perm], labels[perm])
    assert b == pytest.approx(a, rel=1e-9)
    unconditional = distribution_metrics(teacher, images)
    assert unconditional != pytest.approx(a, rel=1e-3)  # labels matter: other weights, other target


def test_glyph_data_floor():
    teacher = builtin_teacher("glyphs16")
    labels = uniform_labels(500, 10, seed=12)
    m = distribution_metrics(teacher, teacher.sample_data(500, torch.Generator().manual_seed(13), labels), labels)
    assert m["rms_to_mean"] == pytest.approx(0.05, rel=0.01) and m["data_rms_to_mean"] == pytest.approx(0.05,
                                                                                                         rel=0.01)
    assert m["component_tv"] < 0.15 and m["data_component_tv"] < 0.15
