"""pid: Physics Informed Distillation and moment matching for EDM diffusion teachers."""

# Teachers and sampling
from pid.teachers import EDMTeacher, load_teacher
from pid.toy import BUILTIN_TEACHERS, GaussianMixtureTeacher, builtin_teacher
from pid.samplers import ablation_sampler, edm_sampler, karras_sigmas
from pid.seeds import StackedRandomGenerator, parse_seeds
from pid.distances import DistanceConfig, make_distance

# PID: student and objective
from pid.methods.pid import (PIDObjective, PIDStudent, build_student_from_spec, is_student_checkpoint, karras_grid,
                             load_student, student_from_teacher)
