"""Moment matching, Algorithm 3 (pid.methods.mm.parameter): the JVP path is the gradient of the preconditioned
squared-gradient objective, the two-half-batch estimate is unbiased, the Adam preconditioner's state survives
resume, N processes = 1 process with accumulation, and every EDM preconditioner works."""

import math

import pytest
import torch
from torch import nn

import edm_networks
from pid.errors import ConfigError
from pid.methods.mm import ParameterMomentMatching, denoiser_from_teacher
from pid.methods.mm.parameter import teacher_loss_grad
from pid.teachers import EDMTeacher
from pid.training.loop import MicroBatch
from test_mm import _final_state, _run_mm, tiny_mixture

CPU = torch.device("cpu")
PRECONDS = {"edm": edm_networks.EDMPrecond, "vp": edm_networks.VPPrecond, "ve": edm_networks.VEPrecond,
            "iddpm": edm_networks.iDDPMPrecond}


def tiny_edm_teacher(kind: str = "edm", attention: bool = True) -> EDMTeacher:
    extra = {"model_type": "DhariwalUNet"} if kind == "iddpm" else {}
    torch.manual_seed(0)
    precond = PRECONDS[kind](img_resolution=8, img_channels=3, label_dim=2, model_channels=16, channel_mult=[1, 2],
                             num_blocks=1, attn_resolutions=[4] if attention else [], **extra)
    return EDMTeacher(precond).eval().requires_grad_(False)


class RandomImages:
    """A data source: images in [-1, 1] and one-hot labels from the passed generator (`pid.data` interface)."""

    def __init__(self, shape=(3, 8, 8), label_dim=2):
        self.shape, self.label_dim = shape, label_dim

    def sample(self, position, n, gen, device):
        x = torch.rand(n, *self.shape, generator=gen) * 2 - 1
        return x.to(device), torch.eye(self.label_dim)[torch.randint(self.label_dim, (n,), generator=gen)].to(device)


def _perturbed(module: nn.Module, scale: float, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def _dot(a: dict, b: dict) -> torch.Tensor:
    return sum((a[n].double() * b[n].double()).sum() for n in a)


# ------------------------------------------------------------------ (a) JVP path = finite difference of F
def test_jvp_surrogate_is_a_quarter_of_the_gradient_of_the_preconditioned_objective():
    teacher = tiny_edm_teacher("edm", attention=True)
    method = ParameterMomentMatching(teacher, RandomImages(), k=2, sigma_min=0.002, sigma_max=80.0,
                                     weight="edm-bounded", preconditioner="adam")
    gen_net = _perturbed(denoiser_from_teacher(teacher, "t.pkl")[0], 0.02, 1)
    g = torch.Generator().manual_seed(2)
    n = 3
    x, labels = method.data.sample(0, 2 * n, g, CPU)
    xt_a, zs_a, sig_a = method.sample_z_s(gen_net, x[:n], labels[:n], g, grad=False)
    g_a = method.moment_gradient(xt_a, zs_a, sig_a, labels[:n])
    # A non-trivial Λ: a random positive second-moment estimate, as if one step had been folded in.
    for name, v in method.precond.v.items():
        v.copy_(torch.rand(v.shape, generator=g) * g_a[name].square().mean() * 4)
    method.precond.folds = 1
    nu = method.direction_(g_a)
    lam_g_a = {k: -t for k, t in nu.items()}
    # Half B with z_t, σ_t, z_s and σ_s held fixed: only x̃_B = g_η(z_t) moves with η.
    sig_t = torch.tensor([0.4, 2.0, 20.0])
    sig_s = torch.tensor([0.1, 0.7, 3.0])
    z_t = x[n:] + sig_t.view(-1, 1, 1, 1) * torch.randn(x[n:].shape, generator=g)
    z_s = x[n:] + sig_s.view(-1, 1, 1, 1) * torch.randn(x[n:].shape, generator=g)
    lab_b = labels[n:]
    w_b = method_weight(method, sig_s)

    def objective() -> float:   # F(η) = ĝ_Aᵀ Λ ĝ_B(η)
        with torch.no_grad():
            x_b = gen_net(z_t, sig_t, lab_b)
        g_b = teacher_loss_grad(method.module, method.params, method.call_kwargs, x_b, z_s, sig_s, lab_b, w_b)
        return float(_dot(lam_g_a, g_b))

    losses, _ = method.surrogate(gen_net(z_t, sig_t, lab_b), z_s, sig_s, lab_b, nu)
    params = [p for p in gen_net.parameters()]
    grads = torch.autograd.grad(losses.sum() / (2 * n), params)   # the trainer's Σ L_i / global batch
    direction = [torch.randn(p.shape, generator=g) for p in params]
    norm = math.sqrt(sum(float(d.square().sum()) for d in direction))
    direction = [d / norm for d in direction]
    analytic = 4 * sum(float((gr * d).sum()) for gr, d in zip(grads, direction))
    h = 1e-2
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        f_plus = objective()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        f_minus = objective()
        for p, d in zip(params, direction):
            p.add_(h * d)
    numeric = (f_plus - f_minus) / (2 * h)
    assert abs(numeric) > 1e-3 * abs(objective()), "the direction must change F"
    assert analytic == pytest.approx(numeric, rel=2e-2)


def method_weight(method, sigma):
    from pid.methods.mm import loss_weight
    return loss_weight(method.weight, sigma, method.sigma_data, method.sigma_floor)


# ------------------------------------------------------------------ (b) unbiasedness of ĝ_Aᵀ Λ ĝ_B
class MixtureData:
    def __init__(self, teacher):
        self.teacher = teacher

    def sample(self, position, n, gen, device):
        labels = torch.eye(self.teacher.label_dim)[torch.randint(self.teacher.label_dim, (n,), generator=gen)]
        return self.teacher.sample_data(n, gen, labels).float(), labels


class ShiftedDenoiser(nn.Module):
    """A generator whose samples are off by a constant: x̃ = D_teacher(z_t) + 0.5 (the moment is non-zero)."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, z, sigma, labels=None):
        return self.teacher(z, sigma, labels).float() + 0.5


def test_two_half_batch_estimate_is_unbiased():
    teacher = tiny_mixture()
    method = ParameterMomentMatching(teacher, MixtureData(teacher), k=2, sigma_min=0.002, sigma_max=80.0,
                                     weight="uniform", preconditioner="identity")
    gen_net = ShiftedDenoiser(tiny_mixture())
    gen = torch.Generator().manual_seed(0)
    lam = {k: torch.rand(p.shape, generator=gen, dtype=p.dtype) + 0.5 for k, p in method.params.items()}

    def batch_grad(n):
        x, labels = method.data.sample(0, n, gen, CPU)
        return method.moment_gradient(*method.sample_z_s(gen_net, x, labels, gen, grad=False), labels)

    n, pairs, big = 32, 400, 40_000
    est, naive = [], []
    for _ in range(pairs):
        g_a, g_b = batch_grad(n), batch_grad(n)
        est.append(float(_dot(g_a, {k: lam[k] * t for k, t in g_b.items()})))
        naive.append(float(_dot(g_a, {k: lam[k] * t for k, t in g_a.items()})))
    est, naive = torch.tensor(est, dtype=torch.float64), torch.tensor(naive, dtype=torch.float64)
    g_big = batch_grad(big)
    full = float(_dot(g_big, {k: lam[k] * t for k, t in g_big.items()}))
    # E[ĝ_nᵀΛĝ_n] = ‖m‖²_Λ + tr(ΛΣ)/n for per-sample gradient covariance Σ, so the full-batch value carries the
    # bias tr(ΛΣ)/N, which the pairs measure: tr(ΛΣ) ≈ n·(mean naive − mean est).
    trace = n * float(naive.mean() - est.mean())
    reference = full - trace / big
    # Standard errors: the mean of the pairs, std(est)/√pairs; the full-batch value, whose variance
    # 4 mᵀΛΣΛm/N is at most 2n/N times var(est) (var(est) ≥ 2 mᵀΛΣΛm/n). Four standard errors of both.
    tol = 4 * float(est.std()) * math.sqrt(1 / pairs + 2 * n / big)
    assert reference > 10 * tol, "the case must have a clearly non-zero moment"
    assert float(est.mean()) == pytest.approx(reference, abs=tol)
    assert float(naive.mean()) - reference > 3 * tol, "the single-batch square must be visibly biased"


# ------------------------------------------------------------------ (c) Adam preconditioner state and resume
def _loss_at(method, nets, step, batch=16, seed=0):
    gen = torch.Generator().manual_seed(seed + step)
    return method.loss(nets, batch, gen, CPU, MicroBatch(step, "generator", 0, step * batch))


def test_adam_preconditioner_waits_one_step_then_round_trips():
    teacher = tiny_mixture()
    make = lambda: ParameterMomentMatching(teacher, MixtureData(teacher), k=2, sigma_min=0.002,  # noqa: E731
                                           sigma_max=80.0, preconditioner="adam", precond_beta2=0.9)
    method = make()
    nets = {"generator": ShiftedDenoiser(tiny_mixture())}
    losses, _ = _loss_at(method, nets, 0)
    assert torch.equal(losses, torch.zeros_like(losses)), "step 0 has no second moments: no update"
    losses, _ = _loss_at(method, nets, 1)
    assert losses.abs().sum() > 0 and method.precond.folds == 1
    state = method.state_dict()          # folds step 1's statistic in
    assert state["preconditioner"]["folds"] == 2
    other = make()
    other.load_state_dict(state)
    for name, v in method.precond.v.items():
        assert torch.equal(v, other.precond.v[name]) and v.abs().sum() > 0
    a, _ = _loss_at(method, nets, 2)
    b, _ = _loss_at(other, nets, 2)
    assert torch.equal(a, b)


def _assert_same_parameter_runs(a, b, exact=True):
    check = (lambda x, y, m: torch.equal(x, y)) if exact else (
        lambda x, y, m: torch.allclose(x, y, rtol=1e-5, atol=1e-6))
    assert set(a["networks"]) == {"generator"}
    for key, value in a["networks"]["generator"].items():
        assert check(value, b["networks"]["generator"][key], key), key
    for key, value in a["ema_sets"]["generator"]["0.99"].items():
        assert check(value, b["ema_sets"]["generator"]["0.99"][key], key), key
    va, vb = a["method"]["preconditioner"]["v"], b["method"]["preconditioner"]["v"]
    for key, value in va.items():
        assert value.abs().sum() > 0 and check(value, vb[key], key), key


def test_resume_is_bit_identical_with_the_adam_preconditioner(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    for outdir, steps, extra in ((full, 6, ()), (part, 3, ()), (part, 6, ("--resume=auto",))):
        res = _run_mm(outdir, steps, "--algorithm=parameter", "--snap=3", *extra)
        assert res.returncode == 0, res.stderr[-2000:]
    a, b = _final_state(full), _final_state(part)
    assert a["step"] == b["step"] == 6
    _assert_same_parameter_runs(a, b)


# ------------------------------------------------------------------ (d) 2 processes = 1 process with accumulation
def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res = _run_mm(one, 4, "--algorithm=parameter", "--batch-gpu=4")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run_mm(two, 4, "--algorithm=parameter", nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_parameter_runs(_final_state(one), _final_state(two), exact=False)


def test_odd_micro_batch_is_one_error_line(tmp_path):
    res = _run_mm(tmp_path / "runs", 1, "--algorithm=parameter", "--batch=8", "--batch-gpu=3")
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("Error:") and "Traceback" not in res.stderr, res.stderr[-2000:]


# ------------------------------------------------------------------ (e) every EDM preconditioner
@pytest.mark.parametrize("kind", sorted(PRECONDS))
def test_one_step_with_each_edm_preconditioner(kind):
    teacher = tiny_edm_teacher(kind, attention=kind != "iddpm")
    method = ParameterMomentMatching(teacher, RandomImages(), k=2, sigma_min=float(teacher.sigma_min),
                                     sigma_max=min(80.0, float(teacher.sigma_max)), preconditioner="identity",
                                     subtract_data_grad=kind == "edm")
    gen_net = _perturbed(denoiser_from_teacher(teacher, "t.pkl")[0], 0.01, 3)
    before = [p.detach().clone() for p in teacher.parameters()]
    losses, stats = _loss_at(method, {"generator": gen_net}, 0)
    assert losses.shape == (8,) and torch.isfinite(losses).all()
    losses.sum().backward()
    grads = [p.grad for p in gen_net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert stats["jvp_rms"] > 0 and all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert all(p.grad is None for p in teacher.parameters()), "the teacher must stay frozen"


def test_builds_only_the_generator_and_rejects_unknown_preconditioners():
    from pid.methods.mm import build_mm_run
    from pid.methods.mm.recipes import MMConfig
    method, nets, _ = build_mm_run(MMConfig(algorithm="parameter", student_preset="tiny"))
    assert set(nets) == {"generator"} and method.phase(0) == method.phase(1) == "generator"
    with pytest.raises(ConfigError, match="preconditioner"):
        build_mm_run(MMConfig(algorithm="parameter", preconditioner="sgd", student_preset="tiny"))


def test_mixture_theta_includes_the_component_std_and_sees_too_smooth_samples():
    """θ of a built-in teacher is (means, log-weights, log std). On samples with no spread around their component
    means (what a few-step sampler's last call produces), the teacher's loss on them grows with its std, so
    ∂ℓ/∂ log s > 0: the moment in parameter space sees the missing spread."""
    from pid.methods.mm.parameter import teacher_parameters
    teacher = tiny_mixture()
    module, params, kwargs = teacher_parameters(teacher)
    assert set(params) == {"teacher.means", "teacher.log_weights", "log_std"}
    z = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(module(z, torch.tensor([0.3, 2.0]), None), teacher(z, torch.tensor([0.3, 2.0])))
    gen = torch.Generator().manual_seed(0)
    comp = torch.randint(0, 4, (256,), generator=gen)
    x = teacher.means[comp].float()
    sigma = torch.full((256,), 0.2)
    z_s = x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    labels = torch.eye(2)[teacher.component_labels[comp]]
    g = teacher_loss_grad(module, params, kwargs, x, z_s, sigma, labels, torch.ones(256))
    assert float(g["log_std"]) > 0
