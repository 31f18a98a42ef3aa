"""The generic trainer: one loop for every distillation method (see loop.py for what a step does).

    from pid.training import TrainConfig, train
    run_dir = train(TrainConfig(outdir="runs", steps=1000, batch=64), method, student)
"""

from pid.training.checkpoint import (is_student_checkpoint, load_latest_state, read_student_checkpoint,
                                     read_training_state, write_student_checkpoint)
from pid.training.config import TrainConfig, ema_name
from pid.training.entry import train
from pid.training.method import Method

__all__ = ["TrainConfig", "train", "Method", "ema_name", "write_student_checkpoint", "read_student_checkpoint",
           "is_student_checkpoint", "read_training_state", "load_latest_state"]
