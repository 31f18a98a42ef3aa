"""Exact evaluation against a built-in analytic teacher (`pid.toy.GaussianMixtureTeacher`).

Its probability-flow ODE can be solved to any accuracy, so a generator's output for a given noise can be
compared with the true endpoint of the same noise, and its samples scored under the true data density.

Stochastic samplers (moment matching's ancestral sampler, its students) have no per-seed endpoint to compare
with; `distribution_metrics` scores their samples as a set against the exact target distribution instead.
"""

import warnings
from typing import Dict, Optional, Tuple

import scipy.linalg
import torch

from pid.samplers import edm_sampler

__all__ = ["REFERENCE_STEPS", "reference_steps", "reference_endpoints", "heun_endpoints", "exact_metrics",
           "mixture_moments", "target_moments", "component_weights", "distribution_metrics"]


@torch.no_grad()
def heun_endpoints(teacher, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                   num_steps: int = 18, chunk: int = 1000) -> torch.Tensor:
    """Deterministic EDM Heun sampler (NFE 2*num_steps-1) from unit-normal latents [N,C,H,W], in chunks.

    Same result as `edm_sampler` with S_churn=0: that noise is multiplied by zero, so it is not even drawn.
    Returns float64 [N,C,H,W].
    """
    outs = []
    for start in range(0, latents.shape[0], chunk):
        labels = None if class_labels is None else class_labels[start:start + chunk]
        outs.append(edm_sampler(teacher, latents[start:start + chunk], labels, randn_like=torch.zeros_like,
                                num_steps=num_steps))
    return torch.cat(outs)


# Heun steps of the reference ODE solution: 512 for an analytic teacher (each call costs microseconds), 64 for a
# network teacher, whose calls are a U-Net's (Heun's error falls as h²: on builtin:glyphs16, 40 steps were already
# within RMSE 0.001 of 512; for builtin:glyphs16-net, 64 steps against 256 are measured in BENCHMARKS.md).
REFERENCE_STEPS = {"analytic": 512, "network": 64}


def reference_steps(teacher) -> int:
    """The default Heun steps of `reference_endpoints` for this teacher (`REFERENCE_STEPS`)."""
    return REFERENCE_STEPS["analytic" if hasattr(teacher, "component_of") else "network"]


def reference_endpoints(teacher, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                        num_steps: Optional[int] = None, chunk: int = 1000) -> torch.Tensor:
    """Endpoints of the teacher's ODE from unit-normal latents [N,C,H,W]: float64 [N,C,H,W].

    Deterministic EDM Heun sampler with `num_steps` steps (NFE 2*num_steps-1; default `REFERENCE_STEPS`, by
    whether the teacher is analytic or a network) in float64; latents are scaled by σ_max inside, exactly as
    `edm_sampler` does, so endpoints match sampler outputs seed for seed.
    """
    return heun_endpoints(teacher, latents, class_labels, num_steps or reference_steps(teacher), chunk)


@torch.no_grad()
def exact_metrics(teacher, images: torch.Tensor, reference: torch.Tensor,
                  class_labels: Optional[torch.Tensor] = None, data_seed: int = 0) -> Dict[str, float]:
    """Score images [N,C,H,W] in [-1,1] against reference ODE endpoints of the same noise [N,C,H,W].

    Returns floats: `rmse` (per-image root mean squared error to the reference, averaged over images),
    `component_accuracy` (fraction whose most likely mixture component equals the reference's),
    `log_likelihood` (mean log p(image) in nats, under the class-conditional mixture when labels are given),
    `data_log_likelihood` (the same for N exact data samples drawn with `data_seed`: the ideal value).
    """
    images = images.to(torch.float64)
    reference = reference.to(images.device, torch.float64)
    rmse = (images - reference).square().flatten(1).mean(1).sqrt()
    same = teacher.component_of(images, class_labels) == teacher.component_of(reference, class_labels)
    gen = torch.Generator().manual_seed(data_seed)
    data = teacher.sample_data(images.shape[0], generator=gen, class_labels=class_labels)
    return {
        "rmse": float(rmse.mean()),
        "component_accuracy": float(same.to(torch.float64).mean()),
        "log_likelihood": float(teacher.log_prob(images, class_labels).mean()),
        "data_log_likelihood": float(teacher.log_prob(data, class_labels).mean()),
    }


def component_weights(teacher, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """w_k = mean_i p(k | label_i), float64 [K]: the component weights of the distribution asked for.

    The images of a sampler come with labels drawn uniformly over classes (EDM's per-seed draw), while the
    mixture's own class weights need not be uniform, so the target is the average of p(x | label_i), not p(x).
    Without labels: the mixture weights π_k.
    """
    if class_labels is None:
        return teacher.log_weights.exp()
    return teacher._prior(class_labels, class_labels.shape[0]).exp().mean(0)


def target_moments(teacher, class_labels: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact mean [D] and covariance [D,D] (float64, D = C·H·W) of Σ_k w_k N(μ_k, s²I), w = component_weights.

    mean m = Σ w_k μ_k; cov = s²I + Σ w_k (μ_k − m)(μ_k − m)ᵀ (law of total covariance).
    """
    w = component_weights(teacher, class_labels)
    mu = teacher.means.reshape(teacher.means.shape[0], -1)
    mean = w @ mu
    centered = mu - mean
    cov = (centered * w[:, None]).T @ centered
    cov.diagonal().add_(teacher.std ** 2)
    return mean, cov


def mixture_moments(teacher) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact mean [D] and covariance [D,D] (float64) of the whole mixture p(x) = Σ π_k N(μ_k, s²I)."""
    return target_moments(teacher, None)


def _sample_moments(flat: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample mean [D] and unbiased covariance [D,D] of rows [N,D] (float64)."""
    mean = flat.mean(0)
    centered = flat - mean
    return mean, centered.T @ centered / (flat.shape[0] - 1)


def _set_scores(teacher, images: torch.Tensor, class_labels, target, weights) -> Dict[str, float]:
    """fd_exact, component_tv, rms_to_mean of one image set [N,C,H,W] float64 on the teacher's device."""
    from pid.metrics.stats import frechet_distance
    flat = images.reshape(images.shape[0], -1)
    mean, cov = _sample_moments(flat)
    with warnings.catch_warnings():  # a sample covariance is singular whenever N <= D or the sampler collapses
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        fd = frechet_distance(mean.cpu().numpy(), cov.cpu().numpy(), target[0].cpu().numpy(),
                              target[1].cpu().numpy())
    comp = teacher.component_of(images, class_labels)
    freq = torch.bincount(comp, minlength=weights.shape[0]).to(torch.float64) / images.shape[0]
    rms = (teacher._sq_dist(images).min(dim=1).values / flat.shape[1]).mean().sqrt()
    return {"fd_exact": fd, "component_tv": float(0.5 * (freq - weights).abs().sum()), "rms_to_mean": float(rms)}


@torch.no_grad()
def distribution_metrics(teacher, images: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                         data_seed: int = 0) -> Dict[str, float]:
    """Score a set of images [N,C,H,W] in [-1,1] (N >= 2) against the exact target distribution.

    The target is Σ_k w_k N(μ_k, s²I) with w_k = mean_i p(k | label_i) (see `component_weights`); class_labels
    [N,label_dim] are the labels the images were generated with (None: unconditional). Returns floats:
    `fd_exact` (Fréchet distance between the images' pixel mean/covariance and the exact target moments),
    `component_tv` (total variation ½Σ|f_k − w_k| between the frequencies f_k of the images' most likely
    component and w_k), `rms_to_mean` (sqrt of the mean over images of min_k ‖x − μ_k‖²/D; the data's value is
    the component std s), and `data_fd_exact`, `data_component_tv`, `data_rms_to_mean`: the same for N exact
    data samples with the same labels (drawn with `data_seed`), the floor a perfect sampler reaches at this N.
    Every value is invariant to the order of the (image, label) pairs: the data samples are drawn for the
    labels sorted by class.
    """
    device = teacher.means.device
    images = images.to(device, torch.float64)
    labels = None if class_labels is None else class_labels.to(device, torch.float64)
    if images.shape[0] < 2:
        raise ValueError(f"distribution_metrics needs at least 2 images, got {images.shape[0]}")
    weights = component_weights(teacher, labels)
    target = target_moments(teacher, labels)
    scores = _set_scores(teacher, images, labels, target, weights)
    sorted_labels = None if labels is None else labels[labels.argmax(dim=1).argsort(stable=True)]
    gen = torch.Generator().manual_seed(data_seed)
    data = teacher.sample_data(images.shape[0], generator=gen, class_labels=sorted_labels)
    floor = _set_scores(teacher, data, sorted_labels, target, weights)
    return {**scores, **{f"data_{k}": v for k, v in floor.items()}}
