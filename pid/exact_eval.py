"""Exact evaluation against a built-in analytic teacher (`pid.toy.GaussianMixtureTeacher`).

Its probability-flow ODE can be solved to any accuracy, so a generator's output for a given noise can be
compared with the true endpoint of the same noise, and its samples scored under the true data density.
"""

from typing import Dict, Optional

import torch

from pid.samplers import edm_sampler

__all__ = ["reference_endpoints", "heun_endpoints", "exact_metrics"]


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


def reference_endpoints(teacher, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                        num_steps: int = 512, chunk: int = 1000) -> torch.Tensor:
    """Endpoints of the teacher's ODE from unit-normal latents [N,C,H,W]: float64 [N,C,H,W].

    Deterministic EDM Heun sampler with `num_steps` steps (NFE 2*num_steps-1) in float64; latents are scaled
    by σ_max inside, exactly as `edm_sampler` does, so endpoints match sampler outputs seed for seed.
    """
    return heun_endpoints(teacher, latents, class_labels, num_steps, chunk)


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
