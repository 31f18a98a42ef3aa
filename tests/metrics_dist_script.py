"""Run under torchrun (gloo, CPU) by tests/test_metrics_evaluate.py: evaluator results with seeds split over ranks.

Usage: torchrun --nproc-per-node=2 metrics_dist_script.py OUT.json DETECTOR.pt REF.npz
"""

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_metrics_evaluate import AncestralGenerator, ToyStudent, teacher_for_tests, OracleStudent  # noqa: E402

from pid.metrics.evaluate import make_evaluator  # noqa: E402


def main(out: str, detector: str, ref: str) -> None:
    dist.init_process_group("gloo")
    fid = make_evaluator(None, num=23, fid_ref=ref, detector=detector, batch=4, device="cpu")(
        ToyStudent(scale=0.9, label_dim=3))
    teacher = teacher_for_tests()
    exact = make_evaluator(teacher, num=7, fid_ref=None, batch=2, device="cpu")(OracleStudent(teacher, offset=0.2))
    stochastic = make_evaluator(teacher, num=7, fid_ref=None, batch=2, device="cpu")(AncestralGenerator(teacher))
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(dict(fid=fid, exact=exact, stochastic=stochastic), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
