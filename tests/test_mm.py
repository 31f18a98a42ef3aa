"""Moment matching (pid.methods.mm): the networks start at the teacher, the generator surrogate's gradient is the
moment-matching gradient, and the trainer's guarantees (exact resume, N processes = 1 process) hold with two
networks."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import edm_networks
from pid.methods.mm import MomentMatching, MMStudent, denoiser_from_teacher, load_mm_student, loss_weight
from pid.teachers import EDMTeacher, load_teacher
from pid.toy import GaussianMixtureTeacher
from pid.training.loop import MicroBatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_mixture() -> GaussianMixtureTeacher:
    """4 components of 3x8x8 in 2 classes (used by tests/test_mm_parameter.py)."""
    g = torch.Generator().manual_seed(0)
    means = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    return GaussianMixtureTeacher(means, torch.tensor([0, 0, 1, 1]), std=0.1, label_dim=2)


@pytest.mark.parametrize("kind", ["edm", "vp", "ve", "iddpm"])
def test_edm_denoiser_copy_equals_teacher(kind):
    cls = {"edm": edm_networks.EDMPrecond, "vp": edm_networks.VPPrecond, "ve": edm_networks.VEPrecond,
           "iddpm": edm_networks.iDDPMPrecond}[kind]
    extra = {"model_type": "DhariwalUNet"} if kind == "iddpm" else {}
    torch.manual_seed(0)
    precond = cls(img_resolution=8, img_channels=3, label_dim=2, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[], **extra)
    teacher = EDMTeacher(precond).eval().requires_grad_(False)
    den, spec = denoiser_from_teacher(teacher, "teacher.pkl")
    x, labels = torch.randn(3, 3, 8, 8) * 5, torch.eye(2)[[0, 1, 1]]
    sigma = teacher.round_sigma(torch.tensor([0.05, 1.0, 20.0]))
    torch.testing.assert_close(den(x, sigma, labels), teacher(x, sigma, labels), rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in den.parameters()) and not any(p.requires_grad for p in teacher.parameters())
    from pid.methods.mm import build_denoiser
    rebuilt = build_denoiser(spec)
    rebuilt.load_state_dict(den.state_dict())
    torch.testing.assert_close(rebuilt(x, sigma, labels), den(x, sigma, labels))


def test_mixture_residual_starts_exactly_at_the_teacher_and_can_move():
    teacher = load_teacher("builtin:glyphs16")
    den, _ = denoiser_from_teacher(teacher, "builtin:glyphs16")
    x, sigma, labels = torch.randn(4, 3, 16, 16), torch.tensor([0.01, 0.3, 4.0, 80.0]), torch.eye(10)[[0, 3, 5, 9]]
    assert torch.equal(den(x, sigma, labels), teacher(x, sigma, labels).float())
    out = den(x, sigma, labels)
    out.square().sum().backward()
    grads = [p.grad for p in den.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads, "the zero-initialised output layer must still receive a gradient"


def test_mixture_adjust_starts_at_the_teacher_and_spans_other_mixtures():
    """The σ-dependent corrections start at zero (the exact teacher) and, set by hand at one σ, reproduce the exact
    denoiser of a mixture with other log-weights and another component std: the family the docs promise."""
    teacher = tiny_mixture()
    den, _ = denoiser_from_teacher(teacher, "builtin:tiny", preset="tiny", mixture_adjust=True)
    x, labels = torch.randn(4, 3, 8, 8) * 1.5, torch.eye(2)[[0, 1, 1, 0]]
    sigma = torch.full((4,), 0.7)
    assert torch.equal(den(x, sigma, labels), teacher(x, sigma, labels).float())
    log_w, std = torch.tensor([0.3, -0.2, 0.5, 0.0], dtype=torch.float64), 0.25
    other = GaussianMixtureTeacher(teacher.means, teacher.component_labels, std=std, log_weights=log_w, label_dim=2)
    var, var2 = teacher.std ** 2 + 0.49, std ** 2 + 0.49
    with torch.no_grad():   # constant corrections through the bias: b = Δ log π, e^γ = var/var', e^h = shrink'/shrink
        den.adjust.linear.bias.copy_(torch.cat([log_w, torch.tensor([var / var2]).log(),
                                                torch.tensor([(std ** 2 / var2) / (teacher.std ** 2 / var)]).log()]))
    torch.testing.assert_close(den(x, sigma, labels), other(x, sigma, labels).float(), rtol=1e-5, atol=1e-5)
    from pid.methods.mm import build_denoiser
    g16, spec16 = denoiser_from_teacher(load_teacher("builtin:glyphs16"), "builtin:glyphs16", mixture_adjust=True)
    with torch.no_grad():
        g16.adjust.linear.weight.normal_()
    rebuilt = build_denoiser(spec16)
    rebuilt.load_state_dict(g16.state_dict())
    x16, s16 = torch.randn(4, 3, 16, 16), torch.tensor([0.01, 0.3, 4.0, 80.0])
    labels16 = torch.eye(10)[[0, 3, 5, 9]]
    assert not torch.equal(g16(x16, s16, labels16), g16.teacher(x16, s16, labels16).float())
    torch.testing.assert_close(rebuilt(x16, s16, labels16), g16(x16, s16, labels16))


def test_loss_weights():
    s = torch.tensor([0.002, 0.05, 0.5, 80.0])
    edm = loss_weight("edm", s)
    torch.testing.assert_close(edm, (s ** 2 + 0.25) / (s * 0.5) ** 2)
    bounded = loss_weight("edm-bounded", s, sigma_floor=0.1)
    assert bounded[0] == bounded[1] == loss_weight("edm", torch.tensor([0.1]))[0] and bounded[3] == edm[3]
    assert torch.equal(loss_weight("uniform", s), torch.ones(4))
    with pytest.raises(ValueError, match="unknown moment-matching weight"):
        loss_weight("foo", s)


# ------------------------------------------------------------------ the surrogate gradient in a Gaussian case
class Affine(nn.Module):
    """x̃ = a·z + b (scalars): a generator whose conditional moments are Gaussian and known in closed form."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b))

    def forward(self, z, sigma, labels=None):
        return self.a * z + self.b


class GaussianCase:
    """Data N(μ, s²) per pixel; fixed σ_t > σ_s; generator x̃ = a·z_t + b; posterior z_s ~ q(z_s | z_t, x̃)."""

    def __init__(self, mu=0.3, s=0.7, sigma_t=2.0, sigma_s=0.8, a=0.4, b=-0.2):
        self.mu, self.s, self.st, self.ss, self.a, self.b = mu, s, sigma_t, sigma_s, a, b
        self.r = sigma_s ** 2 / sigma_t ** 2
        self.tau2 = sigma_s ** 2 * (sigma_t ** 2 - sigma_s ** 2) / sigma_t ** 2
        self.c = s ** 2 / (s ** 2 + sigma_s ** 2)          # teacher: E[x | z_s] = μ + c (z_s − μ)
        V = s ** 2 + sigma_t ** 2                           # Var z_t
        self.beta = self.r + (1 - self.r) * a              # z_s = β z_t + (1−r) b + τ ξ
        self.mean_zt, self.mean_xt = mu, a * mu + b
        self.mean_zs = self.r * mu + (1 - self.r) * self.mean_xt
        self.var_zs = self.beta ** 2 * V + self.tau2
        self.cov_xt_zs, self.cov_zt_zs = a * self.beta * V, self.beta * V

    def aux(self, z_s):  # E_η[x̃ | z_s], the optimal auxiliary denoiser
        return self.mean_xt + self.cov_xt_zs / self.var_zs * (z_s - self.mean_zs)

    def teacher(self, z_s):
        return self.mu + self.c * (z_s - self.mu)

    def mm_gradient(self):
        """∇_(a,b) E[(E[x̃|z_s] − g_θ(z_s))²] with the sampling of z_s held fixed = 2·E[∂x̃/∂η · (m − g_θ)]."""
        k = self.cov_xt_zs / self.var_zs
        # m − g_θ = A + B z_s with
        B = k - self.c
        A = self.mean_xt - k * self.mean_zs - self.mu + self.c * self.mu
        e_zs = self.mean_zs
        e_zt_zs = self.cov_zt_zs + self.mean_zt * e_zs
        grad_b = 2 * (A + B * e_zs)
        grad_a = 2 * (A * self.mean_zt + B * e_zt_zs)
        return torch.tensor([grad_a, grad_b], dtype=torch.float64)


def test_generator_surrogate_gradient_is_half_the_moment_matching_gradient():
    case = GaussianCase()

    class Data:
        def sample(self, position, n, gen, device):
            return case.mu + case.s * torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64).float(), None

    teacher = lambda z, sigma, labels=None: case.teacher(z)  # noqa: E731
    method = MomentMatching(teacher, Data(), k=2, sigma_min=0.002, sigma_max=80.0, weight="uniform")
    n = 200_000
    method.draw_times = lambda m, g: (torch.full((m,), case.st, dtype=torch.float64),
                                      torch.full((m,), case.ss, dtype=torch.float64))
    gen_net = Affine(case.a, case.b)
    aux = lambda z, sigma, labels=None: case.aux(z)  # noqa: E731
    losses, _ = method.loss({"generator": gen_net, "aux": aux}, n, torch.Generator().manual_seed(1),
                            torch.device("cpu"), MicroBatch(1, "generator", 0, 0))
    losses.mean().backward()
    surrogate = torch.stack([gen_net.a.grad, gen_net.b.grad]).double()
    expected = case.mm_gradient() / 2
    # Monte Carlo error: per-sample gradient terms are O(1) with std ≲ 2 here and 16 pixels/sample are averaged,
    # so the standard error is below 2/sqrt(n) ≈ 0.0045; allow 0.02 (4 standard errors and more).
    assert expected.abs().max() > 0.05, "the case must have a non-trivial gradient"
    torch.testing.assert_close(surrogate, expected, atol=0.02, rtol=0)


# ------------------------------------------------------------------------------------- student and trainer
def test_mm_student_checkpoint_round_trip(tmp_path):
    from pid.training.checkpoint import write_student_checkpoint
    teacher16 = load_teacher("builtin:glyphs16")
    den, spec = denoiser_from_teacher(teacher16, "builtin:glyphs16")
    student = MMStudent(den, spec, k=3, sigma_min=0.002, sigma_max=80.0, rho=7.0, img_resolution=16,
                        img_channels=3, label_dim=10, teacher="builtin:glyphs16")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = str(tmp_path / "student-0000001.pt")
    write_student_checkpoint(path, student.export_spec(), {"0.99": student.state_dict()}, "0.99", 1, {"method": "mm"})
    loaded = load_mm_student(path)
    assert loaded.k == 3
    z, labels = torch.randn(2, 3, 16, 16), torch.eye(10)[[1, 2]]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = student.generate(z, labels, randn_like=lambda x: torch.randn(x.shape, generator=g1, dtype=x.dtype))
    b = loaded.generate(z, labels, randn_like=lambda x: torch.randn(x.shape, generator=g2, dtype=x.dtype))
    assert torch.equal(a, b)


def _run_mm(outdir, steps, *extra, env=None, nproc=None):
    args = ["train_mm.py", f"--outdir={outdir}", f"--steps={steps}", "--batch=8", "--eval-every=0",
            "--grid-every=0", "--snap=2", "--log-every=1", "--student-preset=tiny", "--lr-schedule=constant",
            "--warmup=0", *extra]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)


def _final_state(outdir):
    from pid.training.checkpoint import load_latest_state
    from pid.training.rundir import list_runs
    run = list_runs(str(outdir))[-1][1]   # run directories only (--data=teacher keeps its samples beside them)
    return load_latest_state(run)[1]


def _assert_same_states(a, b):
    for name in ("generator", "aux"):
        for key, value in a["networks"][name].items():
            assert torch.equal(value, b["networks"][name][key]), (name, key)
    for key, value in a["ema_sets"]["generator"]["0.99"].items():
        assert torch.equal(value, b["ema_sets"]["generator"]["0.99"][key]), key


def test_resume_is_bit_identical_with_two_networks(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert _run_mm(full, 6).returncode == 0
    assert _run_mm(part, 4).returncode == 0                 # stops at 4 (a generator step just happened)
    res = _run_mm(part, 6, "--resume=auto")
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _final_state(full), _final_state(part)
    assert a["step"] == b["step"] == 6
    _assert_same_states(a, b)
    assert a["optimizers"]["aux"]["state"].keys() == b["optimizers"]["aux"]["state"].keys()


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res = _run_mm(one, 4, "--batch-gpu=4")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run_mm(two, 4, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _final_state(one), _final_state(two)
    for name in ("generator", "aux"):
        for key, value in a["networks"][name].items():
            torch.testing.assert_close(value, b["networks"][name][key], rtol=1e-5, atol=1e-6, msg=(name, key))


def _bad_data_error(tmp_path, data, teacher=None):
    args = [f"--data={data}"] + ([f"--teacher={teacher}"] if teacher else [])
    res = _run_mm(tmp_path / "runs", 1, *args)
    return res


def _png_zip(path, size, labels=True, n=3):
    import io
    import json
    import zipfile
    from PIL import Image
    with zipfile.ZipFile(path, "w") as z:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (size, size), (i * 40, 10, 200)).save(buf, format="PNG")
            z.writestr(f"00000/img{i:08d}.png", buf.getvalue())
        if labels:
            z.writestr("dataset.json", json.dumps({"labels": [[f"00000/img{i:08d}.png", i % 10] for i in range(n)]}))
    return str(path)


@pytest.mark.parametrize("case", ["missing", "resolution", "no-labels", "corrupt"])
def test_bad_data_is_one_error_line(tmp_path, case):
    data = {"missing": str(tmp_path / "nope.zip"),
            "resolution": _png_zip(tmp_path / "d32.zip", 32),
            "no-labels": _png_zip(tmp_path / "nolab.zip", 16, labels=False)}.get(case)
    if case == "corrupt":
        good = _png_zip(tmp_path / "good.zip", 16)
        data = str(tmp_path / "corrupt.zip")
        with open(good, "rb") as f, open(data, "wb") as g:
            g.write(f.read()[:200])
    res = _bad_data_error(tmp_path, data)
    assert res.returncode == 1, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and "Traceback" not in res.stderr, res.stderr
    assert os.path.basename(data) in lines[0]


def test_data_zip_trains(tmp_path):
    data = _png_zip(tmp_path / "d16.zip", 16, n=6)
    res = _run_mm(tmp_path / "runs", 2, f"--data={data}")
    assert res.returncode == 0, res.stderr[-2000:]
