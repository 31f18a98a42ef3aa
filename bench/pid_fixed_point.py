"""What a perfect PID student would reach on the built-in teacher, for each discretization N.

The PID residual on the grid t_0 > … > t_{N−1} is zero exactly when X_{n+1} = X_n + (t_{n+1} − t_n)·(X_n − D(X_n, t_n))/t_n,
i.e. when the student reproduces N−1 Euler steps of the teacher's ODE from z. This script checks that the residual of
that "oracle" student vanishes (so the objective is implemented with the right grid direction and edge index) and
scores its endpoint against the exact ODE endpoint: the best one-step result PID can aim for with that N.

With --scheme=trapezoid the residual is `PIDObjective(residual_scheme='trapezoid')`'s, whose zero is the implicit
trapezoid step X_{n+1} = X_n + (t_{n+1} − t_n)·½(v(X_n, t_n) + v(X_{n+1}, t_{n+1})) (solved here by fixed-point
iteration; the max residual column shows how well), except on the step into σ_min, which stays Euler.

    python bench/pid_fixed_point.py --num=256
    python bench/pid_fixed_point.py --num=512 --grids=8,12,16 --rho=1.5 --scheme=trapezoid
"""

from __future__ import annotations

import os
import sys

import click
import torch


class EulerOracle(torch.nn.Module):
    """x(z, t_n) = n Euler steps of the teacher's ODE from z on the PID grid (t must be a grid point); with
    `trapezoid`, implicit trapezoid steps (fixed-point iteration) except the last step, into σ_min."""

    def __init__(self, teacher, grid: torch.Tensor, trapezoid: bool = False, iterations: int = 300):
        super().__init__()
        self.teacher, self.grid = teacher, grid.double()
        self.trapezoid, self.iterations = trapezoid, iterations
        self.img_channels, self.img_resolution, self.label_dim = (teacher.img_channels, teacher.img_resolution,
                                                                  teacher.label_dim)

    def forward(self, z, t, labels=None):
        n = (self.grid[None, :] - t.double()[:, None]).abs().argmin(1)
        x, out = z.double(), torch.empty_like(z, dtype=torch.float64)
        for k in range(int(n.max()) + 1):
            done = n == k
            out[done] = x[done]
            if k < len(self.grid) - 1:
                hi, lo = self.grid[k], self.grid[k + 1]
                d = (x - self.teacher(x, hi, labels)) / hi
                x2 = x + (lo - hi) * d
                if self.trapezoid and k < len(self.grid) - 2:
                    for _ in range(self.iterations):
                        x2 = x + (lo - hi) * 0.5 * (d + (x2 - self.teacher(x2, lo, labels)) / lo)
                x = x2
        return out


@click.command()
@click.option("--teacher", default="builtin:glyphs16")
@click.option("--num", type=int, default=256, help="Seeds")
@click.option("--grids", default="4,6,8,12,16,32,250", help="Values of N")
@click.option("--rho", type=float, default=7.0, show_default=True, help="Karras grid exponent")
@click.option("--scheme", type=click.Choice(["euler", "trapezoid"]), default="euler", show_default=True,
              help="The residual's rule (train_pid.py --residual-scheme)")
def main(teacher, num, grids, rho, scheme):
    """Print a markdown table: N, max residual of the Euler oracle, its endpoint RMSE and component accuracy."""
    from pid.exact_eval import exact_metrics, reference_endpoints
    from pid.methods.pid import PIDObjective
    from pid.teachers import load_teacher
    net = load_teacher(teacher)
    print("| N | max PID residual of the oracle (L2) | endpoint RMSE | component accuracy |")
    print("|---|---|---|---|")
    reference = None
    for N in (int(v) for v in grids.split(",")):
        obj = PIDObjective(net, N, "l2", rho=rho, residual_scheme=scheme)
        z, labels, n = obj.draw(num, (net.img_channels, net.img_resolution, net.img_resolution), net.label_dim,
                                torch.Generator().manual_seed(0), torch.device("cpu"))
        labels64 = None if labels is None else labels.double()
        oracle = EulerOracle(net, obj.grid, trapezoid=scheme == "trapezoid")
        with torch.no_grad():
            lhs, rhs = obj.residual(oracle, z, labels64, n)
            endpoint = oracle(z, torch.full((num,), float(obj.grid[-1])), labels64)
        if reference is None:
            reference = reference_endpoints(net, z.double() / obj.sigma_max, labels64, num_steps=512)
        m = exact_metrics(net, endpoint.clamp(-1, 1), reference, labels64)
        res = (lhs - rhs).square().flatten(1).mean(1).max()
        print(f"| {N} | {float(res):.1e} | {m['rmse']:.4f} | {m['component_accuracy']:.3f} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
