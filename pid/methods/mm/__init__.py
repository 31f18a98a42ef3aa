"""Moment Matching distillation (Salimans, Mensink, Heek, Hoogeboom, NeurIPS 2024): k-step students.

Algorithm 1 (ancestral sampling) is `pid.samplers.ancestral_sampler`; Algorithm 2 (alternating generator and
auxiliary denoiser) is `MomentMatching`; the student is `MMStudent`. docs/moment_matching.md explains the choices.
"""

from pid.methods.mm.networks import EDMDenoiser, MixtureResidualDenoiser, build_denoiser, denoiser_from_teacher
from pid.methods.mm.objective import WEIGHTS, MomentMatching, loss_weight
from pid.methods.mm.student import MMStudent, build_mm_student_from_spec, load_mm_student

__all__ = ["EDMDenoiser", "MixtureResidualDenoiser", "build_denoiser", "denoiser_from_teacher", "WEIGHTS",
           "MomentMatching", "loss_weight", "MMStudent", "build_mm_student_from_spec", "load_mm_student",
           "build_mm_run"]


def build_mm_run(cfg, seed: int = 0):
    """(method, {'generator', 'aux'} networks, teacher) for an MMConfig; loads the teacher and checks the data."""
    from pid.data import make_data_source
    from pid.teachers import default_sigma_range, load_teacher
    teacher = load_teacher(cfg.teacher)
    data = make_data_source(cfg.data, teacher, seed)
    lo, hi = default_sigma_range(teacher)
    lo = float(cfg.sigma_min if cfg.sigma_min is not None else lo)
    hi = float(cfg.sigma_max if cfg.sigma_max is not None else hi)
    method = MomentMatching(teacher, data, cfg.k, lo, hi, cfg.rho, cfg.weight, cfg.sigma_floor, cfg.force_t1,
                            cfg.aux_lr_mult)
    gen, spec = denoiser_from_teacher(teacher, cfg.teacher, cfg.student_preset, seed)
    aux, _ = denoiser_from_teacher(teacher, cfg.teacher, cfg.student_preset, seed)
    student = MMStudent(gen, spec, k=cfg.k, sigma_min=lo, sigma_max=hi, rho=cfg.rho,
                        img_resolution=teacher.img_resolution, img_channels=teacher.img_channels,
                        label_dim=teacher.label_dim, teacher=cfg.teacher)
    return method, {"generator": student, "aux": aux}, teacher
