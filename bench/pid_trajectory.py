"""Where along the PID grid a student leaves the exact endpoint's mixture component (built-in teachers only).

A PID student x_θ(z, t) represents the whole trajectory of the teacher's probability-flow ODE, not only its end.
For every point t_n of the run's grid this script takes the student's x_θ(z, t_n), solves the *exact* teacher ODE
from there to σ = 0 (Heun, float64, 64 steps on a Karras grid from t_n), and reports how often that lands on the
same mixture component as the exact endpoint of z. At t_0 = σ_max the student is z itself (accuracy 1); the drop
from one grid point to the next shows which links of the chain lose the decision.

    python bench/pid_trajectory.py --ckpt=runs/00000-pid-.../student-0002000.pt --num=500
"""

from __future__ import annotations

import os
import sys

import click
import torch


@click.command()
@click.option("--ckpt", required=True, help="student-<step>.pt of a run on a built-in teacher")
@click.option("--ema", default=None, help="EMA to load  [default: the checkpoint's]")
@click.option("--num", type=int, default=500, show_default=True, help="Seeds 0..num-1 (EDM's per-seed latents)")
def main(ckpt, ema, num):
    """Print a markdown table: grid index, t_n, component accuracy of the exact ODE continued from x_θ(z, t_n)."""
    from pid.exact_eval import reference_endpoints
    from pid.losses import karras_grid
    from pid.metrics.evaluate import seed_inputs
    from pid.samplers import edm_sampler
    from pid.student import load_student
    from pid.teachers import load_teacher
    from pid.training.checkpoint import read_student_checkpoint
    pid_cfg = read_student_checkpoint(ckpt)["run_config"]["extra"]["pid"]
    student = load_student(ckpt, ema=ema).eval()
    teacher = load_teacher(pid_cfg["teacher"])
    if not hasattr(teacher, "component_of"):
        raise SystemExit("this benchmark needs a built-in analytic teacher (builtin:<name>)")
    latents, labels = seed_inputs(list(range(num)), [student.img_channels, student.img_resolution,
                                                     student.img_resolution], student.label_dim, torch.device("cpu"))
    labels64 = None if labels is None else labels.double()
    target = teacher.component_of(reference_endpoints(teacher, latents.double(), labels64), labels64)
    grid = karras_grid(pid_cfg["discretization"], student.sigma_min, student.sigma_max, pid_cfg["rho"]).tolist()
    print(f"N = {len(grid)}, rho = {pid_cfg['rho']:g}, {num} seeds")
    print("| n | t_n | component accuracy of the exact ODE from x_θ(z, t_n) |")
    print("|---|---|---|")
    with torch.no_grad():
        for n, t in enumerate(grid):
            x = student(latents * student.sigma_max, t, labels).double()
            # EDM's deterministic Heun from σ = t (its latents are scaled by sigma_max = t inside)
            end = x if n == len(grid) - 1 else edm_sampler(teacher, x / t, labels64, randn_like=torch.zeros_like,
                                                           num_steps=64, sigma_max=t)
            acc = (teacher.component_of(end, labels64) == target).double().mean()
            print(f"| {n} | {t:.3f} | {float(acc):.3f} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
