"""Moment Matching distillation (Salimans, Mensink, Heek, Hoogeboom, NeurIPS 2024): k-step students.

Algorithm 1 (ancestral sampling) is `pid.samplers.ancestral_sampler`; Algorithm 2 (alternating generator and
auxiliary denoiser) is `MomentMatching`; Algorithm 3 (moments matched in the teacher's parameter space) is
`ParameterMomentMatching`; the student is `MMStudent`. docs/moment_matching.md explains the choices.
"""

from pid.methods.mm.networks import EDMDenoiser, MixtureResidualDenoiser, build_denoiser, denoiser_from_teacher
from pid.methods.mm.objective import WEIGHTS, MomentMatching, loss_weight
from pid.methods.mm.parameter import PRECONDITIONERS, ParameterMomentMatching
from pid.methods.mm.student import MMStudent, build_mm_student_from_spec, load_mm_student

__all__ = ["EDMDenoiser", "MixtureResidualDenoiser", "build_denoiser", "denoiser_from_teacher", "WEIGHTS",
           "MomentMatching", "loss_weight", "PRECONDITIONERS", "ParameterMomentMatching", "MMStudent",
           "build_mm_student_from_spec", "load_mm_student",
           "build_mm_run"]


def build_mm_run(cfg, seed: int = 0):
    """(method, networks, teacher) for an MMConfig; loads the teacher and checks the data.

    Networks: {'generator', 'aux'} for Algorithm 2 ('alternating'), {'generator'} for Algorithm 3 ('parameter').
    """
    from pid.data import check_teacher_data_spec, make_data_source
    from pid.teachers import default_sigma_range, load_teacher
    check_teacher_data_spec(cfg.data, {"teacher_data_num": cfg.teacher_data_num,
                                       "teacher_data_steps": cfg.teacher_data_steps})
    teacher = load_teacher(cfg.teacher)
    data = make_data_source(cfg.data, teacher, seed, teacher_data_num=cfg.teacher_data_num or 10_000,
                            teacher_data_steps=cfg.teacher_data_steps or 18, teacher_spec=cfg.teacher)
    lo, hi = default_sigma_range(teacher)
    lo = float(cfg.sigma_min if cfg.sigma_min is not None else lo)
    hi = float(cfg.sigma_max if cfg.sigma_max is not None else hi)
    common = (teacher, data, cfg.k, lo, hi, cfg.rho, cfg.weight, cfg.sigma_floor, cfg.force_t1)
    if cfg.algorithm == "parameter":
        method = ParameterMomentMatching(*common, preconditioner=cfg.preconditioner, precond_beta2=cfg.precond_beta2,
                                         precond_eps=cfg.precond_eps, subtract_data_grad=cfg.subtract_data_grad)
    elif cfg.algorithm == "alternating":
        method = MomentMatching(*common, aux_lr_mult=cfg.aux_lr_mult)
    else:
        from pid.errors import ConfigError
        raise ConfigError(f"unknown --algorithm {cfg.algorithm!r}; choose alternating or parameter")
    gen, spec = denoiser_from_teacher(teacher, cfg.teacher, cfg.student_preset, seed, cfg.mixture_adjust)
    student = MMStudent(gen, spec, k=cfg.k, sigma_min=lo, sigma_max=hi, rho=cfg.rho,
                        img_resolution=teacher.img_resolution, img_channels=teacher.img_channels,
                        label_dim=teacher.label_dim, teacher=cfg.teacher)
    if cfg.algorithm == "parameter":
        return method, {"generator": student}, teacher
    aux, _ = denoiser_from_teacher(teacher, cfg.teacher, cfg.student_preset, seed, cfg.mixture_adjust)
    return method, {"generator": student, "aux": aux}, teacher
