"""Moment matching, Algorithm 3 (Salimans et al. 2024): moments matched in the teacher's parameter space.

Instead of a trained auxiliary denoiser, the teacher's own denoising loss must be stationary on generated data.
Per-sample teacher loss on a generated sample: ℓ_i(θ) = w(σ_s)·mean_pixels (x̃_i − g_θ(z_s,i, σ_s,i))². With
ĝ = ∇_θ mean_i ℓ_i the objective is F(η) = ĝ_Aᵀ Λ ĝ_B(η): two independent half-batches make it an unbiased
estimate of ‖E ĝ‖²_Λ (docs/moment_matching.md, Algorithm 3). One micro-batch of size 2n:
    x ~ data (2n);  A = first n, B = last n; each half: s, δ, ε, z_t, x̃ = g_η(z_t), z_s ~ q(z_s | z_t, sg x̃)
    ĝ_A = ∇_θ mean_A ℓ   [− the same on real data: x_A with z_s = x_A + σ_s ε' (option subtract_data_grad)]
    ν = −Λ ĝ_A                                   (fp32 or wider, autocast off)
    u_i = J_θ[g_θ(z_s,i, σ_s,i)]·ν, i ∈ B        (torch.func.jvp over torch.func.functional_call, fp32)
    per-sample loss L_i = w_i·mean_pixels(x̃_i · sg u_i), i ∈ B
Since ∂ĝ_B/∂x̃_i = −(2 w_i / (n P)) J_iᵀ (P pixels), ∂F/∂x̃_i = (2 w_i/(n P)) J_i ν, while the trainer optimises
Σ_B L_i / (2n): the step's gradient is ¼ ∇_η F (averaged over micro-batches), z_s's sampling path held fixed.
Random draws in this order: data (2n), A's times/ε/posterior noise, ε' (subtract only), B's times/ε/noise.

Teacher parameters θ: an EDM teacher's preconditioner parameters (used in place: no copy of the weights); the
built-in Gaussian-mixture teachers have no parameters, so their family's parameters play θ: the component means,
the log-weights and the log of the component std (`MixtureFamily`); without the std, θ would not see whether the
generated samples are spread like the data around the components.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

from pid.errors import ConfigError
from pid.methods.mm.objective import MomentMatching, loss_weight
from pid.training import distributed as D

__all__ = ["ParameterMomentMatching", "AdamPreconditioner", "MixtureFamily", "PRECONDITIONERS", "teacher_parameters",
           "teacher_loss_grad", "teacher_jvp"]

PRECONDITIONERS = ("identity", "adam")
Params = Dict[str, torch.Tensor]


class MixtureFamily(nn.Module):
    """A built-in mixture teacher as a function of θ = (teacher.means, teacher.log_weights, log_std)."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher
        self.register_buffer("log_std", torch.tensor(math.log(teacher.std), dtype=torch.float64,
                                                     device=teacher.means.device))

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        return self.teacher(x, sigma, class_labels, std=self.log_std.exp())


def teacher_parameters(teacher: nn.Module) -> Tuple[nn.Module, Params, dict]:
    """(module called functionally, θ as {name: tensor} sharing the teacher's storage, extra call kwargs)."""
    net = getattr(teacher, "net", None)
    if net is not None and hasattr(net, "model"):       # EDMTeacher: θ = the preconditioner's parameters
        return net, dict(net.named_parameters()), {"force_fp32": True}
    if hasattr(teacher, "means") and hasattr(teacher, "log_weights"):   # built-in mixture: its family plays θ
        family = MixtureFamily(teacher)
        return family, {n: b for n, b in family.named_buffers() if b.is_floating_point()}, {}
    raise ConfigError(f"--algorithm=parameter needs an EDM network pickle or a built-in teacher, "
                      f"got {type(teacher).__name__}")


def _call(module: nn.Module, params: Params, kwargs: dict, z: torch.Tensor, sigma: torch.Tensor, labels):
    return functional_call(module, params, (z, sigma, labels), kwargs).float()


def teacher_loss_grad(module: nn.Module, params: Params, kwargs: dict, target: torch.Tensor, z_s: torch.Tensor,
                      sigma: torch.Tensor, labels, w: torch.Tensor) -> Params:
    """∇_θ mean_i w_i·mean_pixels (target_i − g_θ(z_s,i, σ_i))², each entry in θ's dtype (fp32 or wider).

    target, z_s [N,C,H,W]; sigma, w [N] (w may be negative: a difference of two losses in one call).
    """
    target, z_s, sigma, w = target.detach().float(), z_s.detach().float(), sigma.detach().float(), w.detach()

    def loss(p: Params) -> torch.Tensor:
        return (w * (target - _call(module, p, kwargs, z_s, sigma, labels)).square().flatten(1).mean(1)).mean()

    with torch.autocast(z_s.device.type, enabled=False):
        return grad(loss)(params)


def teacher_jvp(module: nn.Module, params: Params, kwargs: dict, z_s: torch.Tensor, sigma: torch.Tensor, labels,
                direction: Params) -> torch.Tensor:
    """J_θ[g_θ(z_s, σ)]·direction: [N,C,H,W] float32, forward mode (one extra tangent per activation)."""
    z_s, sigma = z_s.detach().float(), sigma.detach().float()
    with torch.autocast(z_s.device.type, enabled=False):
        _, tangent = jvp(lambda p: _call(module, p, kwargs, z_s, sigma, labels), (params,), (direction,))
    return tangent.detach()


class AdamPreconditioner:
    """Λ = diag(1/(√v̂ + ε)), v an EMA (β2) of the squared step-mean teacher gradient ĝ_A, v̂ bias-corrected.

    EDM pickles carry no optimizer state, so v is estimated online. The gradients of a step's micro-batches are
    summed into `pending` (`record`) and folded into v once (`fold`), summed over processes first, at the next
    step's first call or when the state is saved: v then depends only on the global batch, never on how it is
    split into processes and accumulation rounds, and the state is the same on every process.
    """

    def __init__(self, params: Params, beta2: float = 0.99, eps: float = 1e-8):
        if not 0.0 <= beta2 < 1.0 or eps <= 0:
            raise ConfigError(f"--precond-beta2 must lie in [0, 1) and --precond-eps be positive, got {beta2}, {eps}")
        self.beta2, self.eps = float(beta2), float(eps)
        self.v = {n: torch.zeros_like(p) for n, p in params.items()}
        self.pending = {n: torch.zeros_like(p) for n, p in params.items()}
        self.count, self.folds = 0, 0

    def ready(self) -> bool:
        """False until one step's statistic has been folded in (the first step has no Λ yet)."""
        return self.folds > 0

    def record(self, g: Params) -> None:
        for n, t in g.items():
            self.pending[n].add_(t)
        self.count += 1

    def fold(self) -> None:
        """v ← β2 v + (1 − β2) ḡ², ḡ the mean over all processes' micro-batches of this step (collective)."""
        count = D.all_reduce_sum_(torch.tensor([float(self.count)], device=next(iter(self.v.values())).device))
        if float(count) == 0:
            return
        for n, s in self.pending.items():
            mean = D.all_reduce_sum_(s) / count.to(s.dtype).reshape(())   # θ may hold scalars (log_std)
            self.v[n].mul_(self.beta2).addcmul_(mean, mean, value=1 - self.beta2)
            s.zero_()
        self.count, self.folds = 0, self.folds + 1

    def apply_(self, g: Params) -> Params:
        """Λ g, in place (g's tensors are overwritten and returned)."""
        correction = 1 - self.beta2 ** self.folds
        for n, t in g.items():
            t.div_((self.v[n] / correction).sqrt_().add_(self.eps))
        return g

    def state_dict(self) -> dict:
        self.fold()   # a collective: every process calls state_dict when the trainer saves
        return {"v": {n: t.clone() for n, t in self.v.items()}, "folds": self.folds}

    def load_state_dict(self, state: dict) -> None:
        for n, t in state["v"].items():
            self.v[n].copy_(t)
        self.folds, self.count = int(state["folds"]), 0
        for s in self.pending.values():
            s.zero_()


class ParameterMomentMatching(MomentMatching):
    """Algorithm 3 as a several-network method with one trainable network: {'generator': MMStudent}.

    Same data path, times, weights and posterior as Algorithm 2 (`MomentMatching`); preconditioner 'identity'
    or 'adam' (`AdamPreconditioner` with precond_beta2, precond_eps); subtract_data_grad: measure the moment
    relative to the teacher's gradient on real data (EDM teachers are not exactly stationary).
    """

    name = "mm-parameter"
    # The teacher is differentiated in forward mode (torch.func.jvp): the trainer's fast paths leave its attention
    # (SDPA has no forward-mode derivative) and its compilation alone.
    teacher_forward_ad = True

    def __init__(self, teacher: nn.Module, data, k: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                 weight: str = "edm", sigma_floor: float = 0.1, force_t1: bool = False,
                 preconditioner: str = "adam", precond_beta2: float = 0.99, precond_eps: float = 1e-8,
                 subtract_data_grad: bool = False):
        super().__init__(teacher, data, k, sigma_min, sigma_max, rho, weight, sigma_floor, force_t1)
        if preconditioner not in PRECONDITIONERS:
            raise ConfigError(f"unknown --preconditioner {preconditioner!r}; choose one of {', '.join(PRECONDITIONERS)}")
        self.module, self.params, self.call_kwargs = teacher_parameters(teacher)
        self.preconditioner, self.subtract_data_grad = preconditioner, bool(subtract_data_grad)
        self.precond = AdamPreconditioner(self.params, precond_beta2, precond_eps) if preconditioner == "adam" else None
        self._last_step: Optional[int] = None

    def to(self, device) -> "ParameterMomentMatching":
        super().to(device)
        self.module, self.params, self.call_kwargs = teacher_parameters(self.teacher)  # the moved tensors
        if self.precond is not None:
            p = self.precond
            p.v = {n: t.to(device) for n, t in p.v.items()}
            p.pending = {n: t.to(device) for n, t in p.pending.items()}
        return self

    def phase(self, step: int) -> str:
        return "generator"

    def config_dict(self) -> dict:
        d = super().config_dict()
        d.update(name=self.name, algorithm="parameter", preconditioner=self.preconditioner,
                 subtract_data_grad=self.subtract_data_grad)
        if self.precond is not None:
            d.update(precond_beta2=self.precond.beta2, precond_eps=self.precond.eps)
        return d

    def state_dict(self) -> dict:
        return {"preconditioner": self.precond.state_dict() if self.precond is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.precond is not None and state.get("preconditioner") is not None:
            self.precond.load_state_dict(state["preconditioner"])

    def moment_gradient(self, x_tilde: torch.Tensor, z_s: torch.Tensor, sigma_s: torch.Tensor, labels,
                        x_real: Optional[torch.Tensor] = None, z_real: Optional[torch.Tensor] = None) -> Params:
        """ĝ_A (minus the real-data gradient when x_real/z_real are given: one functional call on both)."""
        w = loss_weight(self.weight, sigma_s, self.sigma_data, self.sigma_floor)
        if x_real is None:
            return teacher_loss_grad(self.module, self.params, self.call_kwargs, x_tilde, z_s, sigma_s, labels, w)
        both = lambda a, b: torch.cat([a, b]) if a is not None else None  # noqa: E731
        g = teacher_loss_grad(self.module, self.params, self.call_kwargs, both(x_tilde, x_real), both(z_s, z_real),
                              both(sigma_s, sigma_s), both(labels, labels), torch.cat([w, -w]))
        return {n: 2 * t for n, t in g.items()}   # the call averaged over 2n samples; each half is a mean over n

    def direction_(self, g: Params) -> Optional[Params]:
        """ν = −Λ ĝ_A computed in ĝ_A's tensors (consumed: no extra teacher-sized copy), or None while the Adam
        preconditioner has no statistic yet (first step)."""
        if self.precond is not None and not self.precond.ready():
            return None
        nu = self.precond.apply_(g) if self.precond is not None else g
        for t in nu.values():
            t.neg_()
        return nu

    def surrogate(self, x_tilde: torch.Tensor, z_s: torch.Tensor, sigma_s: torch.Tensor, labels,
                  nu: Optional[Params]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(per-sample losses w·mean_pixels(x̃ · sg J_θν) [n], u = J_θν) for half B; zero losses when ν is None."""
        if nu is None:
            u = torch.zeros_like(x_tilde, dtype=torch.float32)
        else:
            u = teacher_jvp(self.module, self.params, self.call_kwargs, z_s, sigma_s, labels, nu)
        w = loss_weight(self.weight, sigma_s, self.sigma_data, self.sigma_floor)
        return w * (x_tilde.float() * u).flatten(1).mean(1), u

    def loss(self, nets: Dict[str, nn.Module], batch_size: int, generator: torch.Generator, device: torch.device,
             ctx) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Per-sample losses of half B [batch_size/2] (gradient into the generator only) and logged stats."""
        if batch_size % 2:
            raise ConfigError(f"--algorithm=parameter splits every micro-batch into halves A and B: the per-process "
                              f"micro-batch must be even, got {batch_size} (change --batch or --batch-gpu)")
        if self.precond is not None and ctx.step != self._last_step:
            self.precond.fold()   # the previous step's statistic: a collective at every process's first round
        self._last_step = ctx.step
        n = batch_size // 2
        x, labels = self.data.sample(ctx.position, batch_size, generator, device)
        lab_a, lab_b = (None, None) if labels is None else (labels[:n], labels[n:])
        gen_net = nets["generator"]
        xt_a, zs_a, sig_a = self.sample_z_s(gen_net, x[:n], lab_a, generator, grad=False)
        real = {}
        if self.subtract_data_grad:
            eps = torch.randn(zs_a.shape, generator=generator, device=generator.device).to(device)
            real = {"x_real": x[:n].float(), "z_real": x[:n].float() + sig_a.view(-1, 1, 1, 1) * eps}
        # ĝ_A before B's generator graph exists: the teacher's backward and that graph never share the peak
        g = self.moment_gradient(xt_a, zs_a, sig_a, lab_a, **real)
        g_rms = (sum(t.float().square().sum() for t in g.values()) / sum(t.numel() for t in g.values())).sqrt()
        if self.precond is not None:
            self.precond.record(g)
        nu = self.direction_(g)   # overwrites g: ν and the JVP's tangents are the only teacher-sized temporaries
        del g
        xt_b, zs_b, sig_b = self.sample_z_s(gen_net, x[n:], lab_b, generator, grad=True)
        losses, u = self.surrogate(xt_b, zs_b, sig_b, lab_b, nu)
        return losses, {"teacher_grad_rms": g_rms, "jvp_rms": u.square().mean().sqrt()}
