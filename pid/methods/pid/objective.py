"""The PID objective (Physics Informed Distillation, Tee et al. 2024): the residual loss on an N-point grid.

`PIDObjective` implements the trainer's `Method` protocol (see pid.training); distances live in pid.distances.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from pid.distances import DistanceConfig, make_distance
from pid.errors import ConfigError
from pid.teachers import default_sigma_range

__all__ = ["karras_grid", "pair_indices", "PIDObjective", "RESIDUAL_PRECISIONS", "RESIDUAL_GRADS", "RESIDUAL_SCHEMES"]

RESIDUAL_PRECISIONS = ("fp32", "amp")
RESIDUAL_GRADS = ("both", "lower")
RESIDUAL_SCHEMES = ("euler", "trapezoid")


MAX_GRID_POINTS = 10 ** 6   # the reference uses 250; a bound keeps absurd values from exhausting memory


def karras_grid(num: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """N-point Karras σ grid, float64 [num], index 0 = sigma_max, index num−1 = sigma_min (PID §(a))."""
    if not 2 <= num <= MAX_GRID_POINTS:
        raise ConfigError(f"the discretization needs 2 to {MAX_GRID_POINTS:,} grid points (--discretization), "
                          f"got {num}")
    if not 0 < rho < float("inf"):
        raise ConfigError(f"--rho must be a finite number > 0, got {rho}")
    if not 0 < sigma_min < sigma_max < float("inf"):
        raise ConfigError(f"need 0 < --sigma-min < --sigma-max < inf, got {sigma_min} and {sigma_max}")
    n = torch.arange(num, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + n / (num - 1) * (lo - hi)) ** rho


def pair_indices(n: torch.Tensor, num: int) -> torch.Tensor:
    """The neighbour used for the finite difference: n+1, except the last index N−1, which pairs with N−2."""
    m = n + 1
    return torch.where(m == num, torch.full_like(m, num - 2), m)


def parse_link_weights(value, num: int) -> list | None:
    """None for uniform (None, 'uniform'); else N non-negative sampling weights of the grid indices (a list or a
    comma-separated string), not all zero. ConfigError otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "uniform"):
        return None
    try:
        weights = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except ValueError:
        raise ConfigError(f"--link-weights={value!r}: give 'uniform' or {num} comma-separated numbers") from None
    if len(weights) != num:
        raise ConfigError(f"--link-weights has {len(weights)} numbers, but the grid has N = {num} indices: give "
                          f"one weight per index (or 'uniform')")
    if any(not (w >= 0 and w < float("inf")) for w in weights) or sum(weights) <= 0:
        raise ConfigError("--link-weights must be finite, non-negative and not all zero")
    return weights


class PIDObjective:
    """The PID residual loss, one micro-batch at a time (implements the trainer's `Method` protocol).

    For z ~ N(0, T²I) and a grid index n drawn uniformly from {0..N−1} per sample (t = t_n, t' = t_{n'}):
        X, X' = x_θ(z, t), x_θ(z, t')                 (one student call on the 2B batch; both carry gradient)
        lhs   = X − t·(X − X')/(t − t')               (x − t·dx/dt with a first-order finite difference)
        rhs   = D_φ(sg(X), t)                         (teacher, no gradient at all)
        loss  = d(lhs, rhs), time weight 1.
    Randomness is drawn from the given generator in this order: z, labels (if conditional), n.

    Options beyond the paper (its choices are the defaults): `time_weight` p multiplies link n's loss by
    max(|c_n|, 1)^p, c_n = t/(t − t'); `residual_grad='lower'` lets only the lower-noise output of a link carry
    gradient (X' regressed onto the teacher's Euler step from sg(X)); `residual_scheme='trapezoid'` makes the
    target the trapezoid rule's, rhs = ½(X + D(X, t)) − ½·t·v(X', t'), v(x, s) = (x − D(x, s))/s, with both
    student points detached (one more teacher call; links that end at σ_min keep Euler's target).

    Precision: the finite difference multiplies the rounding error of X and X' by t/(t − t') (11–46 on the
    N = 250 grid), so under fp16/bf16 autocast the student's forward and the difference run in fp32
    (`residual_precision='fp32'`); the teacher and the distance keep the trainer's precision (their errors are not
    amplified). 'amp' runs the student under autocast too, as the reference's fp16 U-Net does: cheaper, but
    its residual carries the amplified rounding (BENCHMARKS.md, PID (e)).
    """

    name = "pid"

    def __init__(self, teacher: nn.Module, num_steps: int = 250, distance: DistanceConfig | str = "l2",
                 sigma_min: float | None = None, sigma_max: float | None = None, rho: float = 7.0,
                 device: torch.device | str | None = None, residual_precision: str = "fp32",
                 link_weights: str | list | None = None, residual_grad: str = "both",
                 time_weight: float = 0.0, residual_scheme: str = "euler"):
        if residual_grad not in RESIDUAL_GRADS:
            raise ConfigError(f"unknown --residual-grad={residual_grad!r}; choose both (the paper's: both student "
                              f"outputs of a link carry gradient) or lower (only the lower-noise one)")
        if residual_scheme not in RESIDUAL_SCHEMES:
            raise ConfigError(f"unknown --residual-scheme={residual_scheme!r}; choose euler (the paper's) or "
                              f"trapezoid (the teacher at both ends of a link)")
        time_weight = float(time_weight)
        if not abs(time_weight) <= 8:
            raise ConfigError(f"--time-weight must be a number between -8 and 8 (the power of t/(t - t') that "
                              f"weights a link's loss; 0 = the paper's uniform weight), got {time_weight}")
        self.residual_grad, self.residual_scheme, self.time_weight = residual_grad, residual_scheme, time_weight
        if residual_precision not in RESIDUAL_PRECISIONS:
            raise ConfigError(f"unknown --residual-precision={residual_precision!r}; choose fp32 (the student and "
                              f"the finite difference in fp32) or amp (the student under --precision's autocast)")
        self.teacher = teacher
        self.residual_precision = residual_precision
        self.num_steps = int(num_steps)
        lo, hi = default_sigma_range(teacher)
        self.sigma_min = float(sigma_min if sigma_min is not None else lo)
        self.sigma_max = float(sigma_max if sigma_max is not None else hi)
        self.rho = float(rho)
        self.distance_config = DistanceConfig(name=distance) if isinstance(distance, str) else distance
        self.distance = make_distance(self.distance_config, device)
        grid = karras_grid(self.num_steps, self.sigma_min, self.sigma_max, self.rho)
        self.grid = grid.float()
        # c_n = t_n/(t_n − t_n') from the float64 grid: the f32 grid's rounding would be amplified like X's.
        self.fd_coef = (grid / (grid - grid[pair_indices(torch.arange(self.num_steps), self.num_steps)])).float()
        self.link_weights = parse_link_weights(link_weights, self.num_steps)
        # Loss weight of index n: max(|c_n|, 1)^p (the edge link, |c| < 1, keeps 1).
        self.loss_weight = self.fd_coef.abs().clamp(min=1.0) ** self.time_weight
        self._link_p = None if self.link_weights is None else torch.tensor(self.link_weights, dtype=torch.float64)

    def to(self, device: torch.device | str) -> "PIDObjective":
        """Move the teacher and the distance network (LPIPS) to `device` (the trainer calls this)."""
        self.teacher.to(device)
        if isinstance(self.distance, nn.Module):
            self.distance.to(device)
        return self

    def config_dict(self) -> dict:
        """JSON-able description; a resumed run must have the same one."""
        return {"name": self.name, "discretization": self.num_steps, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "rho": self.rho, "distance": vars(self.distance_config).copy(),
                "residual_precision": self.residual_precision,
                **({} if self.residual_grad == "both" else {"residual_grad": self.residual_grad}),
                **({} if self.time_weight == 0 else {"time_weight": self.time_weight}),
                **({} if self.residual_scheme == "euler" else {"residual_scheme": self.residual_scheme}),
                **({} if self.link_weights is None else {"link_weights": list(self.link_weights)})}

    def draw(self, batch_size: int, shape: tuple[int, int, int], label_dim: int, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """This micro-batch's randomness: z [B,C,H,W] (std σ_max), one-hot labels [B,K] or None, indices n [B]."""
        gdev = generator.device
        z = torch.randn((batch_size, *shape), generator=generator, device=gdev) * self.sigma_max
        labels = None
        if label_dim > 0:
            idx = torch.randint(label_dim, (batch_size,), generator=generator, device=gdev)
            labels = torch.eye(label_dim, device=gdev)[idx]
        if self.link_weights is None:   # the paper's uniform index (bit-for-bit the reference's draw)
            n = torch.randint(self.num_steps, (batch_size,), generator=generator, device=gdev)
        else:
            n = torch.multinomial(self._link_p.to(gdev), batch_size, replacement=True, generator=generator)
        return z.to(device), (labels.to(device) if labels is not None else None), n.to(device)

    def residual(self, student: nn.Module, z: torch.Tensor, labels: torch.Tensor | None,
                 n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs with gradient, detached teacher target), both [B,C,H,W] f32, for given noise and grid indices."""
        grid = self.grid.to(z.device)
        t, t2 = grid[n], grid[pair_indices(n, self.num_steps)]
        c = self.fd_coef.to(z.device)[n]              # t/(t − t')
        with self._student_autocast(z.device):
            both = student(torch.cat([z, z]), torch.cat([t, t2]),
                           None if labels is None else torch.cat([labels, labels]))
        with torch.autocast(z.device.type, enabled=False):
            x, x2 = both.float().chunk(2)
            if self.residual_grad == "lower":   # gradient only through the lower-noise output of each link
                upper = (t > t2).view(-1, 1, 1, 1)
                x, x2 = torch.where(upper, x.detach(), x), torch.where(upper, x2, x2.detach())
            lhs = x - c.view(-1, 1, 1, 1) * (x - x2)
        with torch.no_grad():
            rhs = self.teacher(x.detach(), t, labels).float()
            if self.residual_scheme == "trapezoid":
                rhs = self._trapezoid_target(x.detach(), x2.detach(), rhs, t, t2, labels, n)
        return lhs, rhs

    def _trapezoid_target(self, x, x2, d, t, t2, labels, n):
        """The target that makes the residual vanish when (X − X')/(t − t') = ½(v(X, t) + v(X', t')), v(x, s) =
        (x − D(x, s))/s: the trapezoid rule (second order) instead of Euler's v(X, t). Links that end at σ_min keep
        Euler's target: over that last, stiff step the trapezoid rule barely damps the noise (as EDM's Heun sampler
        skips its correction on the step to σ = 0)."""
        v2 = (x2 - self.teacher(x2, t2, labels).float()) / t2.view(-1, 1, 1, 1)
        trapezoid = 0.5 * (x + d) - 0.5 * t.view(-1, 1, 1, 1) * v2
        inner = (n < self.num_steps - 2).view(-1, 1, 1, 1)   # n = N−2 ends at σ_min; N−1 pairs with N−2
        return torch.where(inner, trapezoid, d)

    def _student_autocast(self, device: torch.device):
        """Autocast off for the student (residual_precision 'fp32'); the trainer's autocast otherwise."""
        if self.residual_precision == "fp32":
            return torch.autocast(device.type, enabled=False)
        return contextlib.nullcontext()

    def loss(self, student: nn.Module, batch_size: int, generator: torch.Generator,
             device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample PID losses [B] (with gradient) and logging stats."""
        shape = (student.img_channels, student.img_resolution, student.img_resolution)
        z, labels, n = self.draw(batch_size, shape, student.label_dim, generator, device)
        lhs, rhs = self.residual(student, z, labels, n)
        losses = self.distance(lhs, rhs)
        if self.time_weight != 0:
            losses = losses * self.loss_weight.to(losses.device)[n]
        stats = {"residual_rms": (lhs.detach() - rhs).square().mean().sqrt()}  # a tensor: no GPU sync here
        return losses, stats
