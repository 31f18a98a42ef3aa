"""What a perfect PID student would reach on the built-in teacher, for each discretization N.

The PID residual on the grid t_0 > … > t_{N−1} is zero exactly when X_{n+1} = X_n + (t_{n+1} − t_n)·(X_n − D(X_n, t_n))/t_n,
i.e. when the student reproduces N−1 Euler steps of the teacher's ODE from z. This script checks that the residual of
that "oracle" student vanishes (so the objective is implemented with the right grid direction and edge index) and
scores its endpoint against the exact ODE endpoint: the best one-step result PID can aim for with that N.

    python bench/pid_fixed_point.py --num=256
"""

from __future__ import annotations

import os
import sys

import click
import torch


class EulerOracle(torch.nn.Module):
    """x(z, t_n) = n Euler steps of the teacher's ODE from z on the PID grid (t must be a grid point)."""

    def __init__(self, teacher, grid: torch.Tensor):
        super().__init__()
        self.teacher, self.grid = teacher, grid.double()
        self.img_channels, self.img_resolution, self.label_dim = (teacher.img_channels, teacher.img_resolution,
                                                                  teacher.label_dim)

    def forward(self, z, t, labels=None):
        n = (self.grid[None, :] - t.double()[:, None]).abs().argmin(1)
        x, out = z.double(), torch.empty_like(z, dtype=torch.float64)
        for k in range(int(n.max()) + 1):
            done = n == k
            out[done] = x[done]
            if k < len(self.grid) - 1:
                d = (x - self.teacher(x, self.grid[k], labels)) / self.grid[k]
                x = x + (self.grid[k + 1] - self.grid[k]) * d
        return out


@click.command()
@click.option("--teacher", default="builtin:glyphs16")
@click.option("--num", type=int, default=256, help="Seeds")
@click.option("--grids", default="4,6,8,12,16,32,250", help="Values of N")
@click.option("--rho", type=float, default=7.0, show_default=True, help="Karras grid exponent")
def main(teacher, num, grids, rho):
    """Print a markdown table: N, max residual of the Euler oracle, its endpoint RMSE and component accuracy."""
    from pid.exact_eval import exact_metrics, reference_endpoints
    from pid.methods.pid import PIDObjective
    from pid.teachers import load_teacher
    net = load_teacher(teacher)
    print("| N | max PID residual of the oracle (L2) | endpoint RMSE | component accuracy |")
    print("|---|---|---|---|")
    reference = None
    for N in (int(v) for v in grids.split(",")):
        obj = PIDObjective(net, N, "l2", rho=rho)
        z, labels, n = obj.draw(num, (net.img_channels, net.img_resolution, net.img_resolution), net.label_dim,
                                torch.Generator().manual_seed(0), torch.device("cpu"))
        labels64 = None if labels is None else labels.double()
        oracle = EulerOracle(net, obj.grid)
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
