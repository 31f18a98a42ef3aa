"""pid: Physics Informed Distillation and moment matching for EDM diffusion teachers."""

# Teachers and sampling (issue 3)
from pid.teachers import EDMTeacher, load_teacher
from pid.toy import BUILTIN_TEACHERS, GaussianMixtureTeacher, builtin_teacher
from pid.samplers import ablation_sampler, edm_sampler, karras_sigmas
from pid.seeds import StackedRandomGenerator, parse_seeds

# PID: student and objective (issue 4)
from pid.student import PIDStudent, build_student_from_spec, is_student_checkpoint, load_student, student_from_teacher
from pid.losses import DistanceConfig, PIDObjective, karras_grid, make_distance
