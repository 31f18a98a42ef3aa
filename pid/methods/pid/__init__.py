"""Physics Informed Distillation: the student x_θ(z, t), the residual objective and the named recipes."""

from pid.methods.pid.objective import PIDObjective, karras_grid, pair_indices
from pid.methods.pid.student import (PIDStudent, build_student_from_spec, is_student_checkpoint, load_student,
                                     student_from_teacher)

__all__ = ["PIDObjective", "karras_grid", "pair_indices", "PIDStudent", "build_student_from_spec",
           "is_student_checkpoint", "load_student", "student_from_teacher"]
