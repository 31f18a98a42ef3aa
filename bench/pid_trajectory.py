"""Where along the PID grid a student leaves the exact endpoint's mixture component (built-in teachers only).

A PID student x_θ(z, t) represents the whole trajectory of the teacher's probability-flow ODE, not only its end.
For every point t_n of the run's grid this script takes the student's x_θ(z, t_n), solves the *exact* teacher ODE
from there to σ = 0 (Heun, float64, 64 steps on a Karras grid from t_n), and reports how often that lands on the
same mixture component as the exact endpoint of z. At t_0 = σ_max the student is z itself (accuracy 1); the drop
from one grid point to the next shows which links of the chain lose the decision.

Two more columns: the same accuracy when the continuation is instead the teacher's Euler chain on the run's own
grid (what a perfect PID student would do from there: the objective's fixed point), and the mean squared PID
residual (L2, per pixel) of link n, i.e. the run's loss restricted to grid index n, with its median over seeds
(a median far below the mean: a few seeds carry the loss). Below the table: how sharp the
one-step outputs are. Each output is written as the affine combination of its class's component means closest to
it (least squares, weights summing to 1); the weight on the exact endpoint's component is near 1 for a committed
sample and near 1/2 or below for a blend.

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
    from pid.methods.pid import PIDObjective, karras_grid
    from pid.metrics.evaluate import seed_inputs
    from pid.samplers import edm_sampler
    from pid.methods.pid.student import load_student
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
    objective = PIDObjective(teacher, len(grid), "l2", student.sigma_min, student.sigma_max, pid_cfg["rho"])
    z = latents * student.sigma_max
    print(f"N = {len(grid)}, rho = {pid_cfg['rho']:g}, {num} seeds")
    print("| n | t_n | accuracy: exact ODE from x_θ(z, t_n) | accuracy: Euler on the grid from x_θ(z, t_n) "
          "| mean squared residual of link n | its median over seeds |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for n, t in enumerate(grid):
            x = student(z, t, labels).double()
            # EDM's deterministic Heun from σ = t (its latents are scaled by sigma_max = t inside)
            end = x if n == len(grid) - 1 else edm_sampler(teacher, x / t, labels64, randn_like=torch.zeros_like,
                                                           num_steps=64, sigma_max=t)
            acc = (teacher.component_of(end, labels64) == target).double().mean()
            euler = x
            for m in range(n, len(grid) - 1):
                euler = euler + (grid[m + 1] - grid[m]) * (euler - teacher(euler, grid[m], labels64)) / grid[m]
            acc_euler = (teacher.component_of(euler, labels64) == target).double().mean()
            lhs, rhs = objective.residual(student, z, labels, torch.full((num,), n))
            res = (lhs.double() - rhs.double()).square().flatten(1).mean(1)  # per seed
            print(f"| {n} | {t:.3f} | {float(acc):.3f} | {float(acc_euler):.3f} | {float(res.mean()):.2e} "
                  f"| {float(res.median()):.2e} |")
        one_step = x.clamp(-1, 1)  # x_θ(z, σ_min) as sample.py writes it
        weights = _weight_on_component(teacher, one_step, labels64, target)
    right = teacher.component_of(one_step, labels64) == target
    for name, mask in (("right", right), ("wrong", ~right)):
        if mask.any():
            q = torch.quantile(weights[mask], torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            print(f"one-step outputs on the {name} component ({int(mask.sum())}): weight on the exact endpoint's "
                  f"component, quantiles 10/50/90%: {q[0]:.2f} / {q[1]:.2f} / {q[2]:.2f}")


def _weight_on_component(teacher, x, labels, component):
    """Per image: the weight of `component` in the affine combination of its class's means nearest to x."""
    means = teacher.means.reshape(teacher.means.shape[0], -1)
    classes = None if labels is None else labels.argmax(1)
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        ks = torch.arange(means.shape[0]) if classes is None else \
            (teacher.component_labels == classes[i]).nonzero().flatten()
        m = means[ks]
        w = torch.linalg.lstsq((m[1:] - m[0]).T, x[i].flatten() - m[0]).solution
        w = torch.cat([(1 - w.sum()).reshape(1), w])
        out[i] = w[(ks == component[i]).nonzero().flatten()[0]]
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
