"""PID objective and distances: the loss equals an independent, per-sample transcription of the reference
algorithm (both student evaluations carry gradient, edge index N−1 ↔ N−2, teacher fully detached)."""

import math

import pytest
import torch

import edm_networks
from pid.errors import ConfigError, DownloadError
from pid.distances import (DistanceConfig, LPIPSDistance, load_vgg16_features, make_distance,
                           pseudo_huber_distance, write_random_vgg16)
from pid.methods.pid import PIDObjective, karras_grid, pair_indices
from pid.methods.pid.student import student_from_teacher
from pid.teachers import EDMTeacher

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def tiny_teacher(kind: str, label_dim: int = 0) -> EDMTeacher:
    precond = {"edm": edm_networks.EDMPrecond, "vp": edm_networks.VPPrecond, "ve": edm_networks.VEPrecond}[kind]
    torch.manual_seed(1)
    net = precond(img_resolution=8, img_channels=3, label_dim=label_dim, model_type="SongUNet", **TINY)
    with torch.no_grad():  # EDM zero-initialises the output conv: perturb so that F depends on its inputs
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return EDMTeacher(net.eval().requires_grad_(False), f"tiny-{kind}")


def reference_losses(student, teacher, z, labels, n, N, smin, smax, rho=7.0, detach_teacher=True):
    """Direct transcription of the reference training step, one sample at a time, two separate student calls."""
    ts = [(smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for i in range(N)]
    out = []
    for i in range(z.shape[0]):
        a = int(n[i])
        b = a + 1 if a + 1 < N else N - 2
        t, t2 = ts[a], ts[b]
        y = None if labels is None else labels[i:i + 1]
        X = student(z[i:i + 1], torch.tensor([t]), y)
        X2 = student(z[i:i + 1], torch.tensor([t2]), y)
        lhs = X - t * (X - X2) / (t - t2)
        if detach_teacher:
            with torch.no_grad():
                rhs = teacher(X.detach(), torch.tensor([t]), y)
        else:  # a wrong variant (gradient through the teacher into X), to show that the test can tell
            rhs = teacher(X, torch.tensor([t]), y)
        out.append((lhs - rhs).square().mean())
    return torch.stack(out)


def grads(student, loss):
    student.zero_grad()
    loss.sum().backward()
    return [p.grad.clone() for p in student.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind,label_dim", [("edm", 0), ("vp", 0), ("ve", 4)])
def test_pid_loss_matches_reference_transcription(kind, label_dim):
    teacher = tiny_teacher(kind, label_dim)
    student = student_from_teacher(teacher, "tiny")
    with torch.no_grad():  # move the student away from the teacher so that the residual is not trivial
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    N = 4
    obj = PIDObjective(teacher, num_steps=N, distance="l2")
    z, labels, _ = obj.draw(8, (3, 8, 8), label_dim, torch.Generator().manual_seed(0), torch.device("cpu"))
    n = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])  # every index, including the edge N−1 and t = σ_max
    lhs, rhs = obj.residual(student, z, labels, n)
    ours = obj.distance(lhs, rhs)
    ref = reference_losses(student, teacher, z, labels, n, N, obj.sigma_min, obj.sigma_max)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6)
    g_ours, g_ref = grads(student, ours), grads(student, reference_losses(student, teacher, z, labels, n, N,
                                                                          obj.sigma_min, obj.sigma_max))
    assert len(g_ours) == len(g_ref) > 0
    scale = max(float(b.abs().max()) for b in g_ref)  # f32 round-off, amplified by t/Δt, is relative to this
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale)
    # Gradient through the teacher branch would change the update: the detach is really tested.
    wrong = grads(student, reference_losses(student, teacher, z, labels, n, N, obj.sigma_min, obj.sigma_max,
                                            detach_teacher=False))
    assert max(float((a - b).abs().max()) for a, b in zip(g_ours, wrong)) > 1e-2 * scale


def test_loss_draws_from_generator_only_and_both_evaluations_carry_gradient():
    teacher = tiny_teacher("edm")
    student = student_from_teacher(teacher, "tiny")
    obj = PIDObjective(teacher, num_steps=5, distance="l2")
    l1, _ = obj.loss(student, 6, torch.Generator().manual_seed(3), torch.device("cpu"))
    torch.manual_seed(123)  # the global RNG must not matter
    l2, stats = obj.loss(student, 6, torch.Generator().manual_seed(3), torch.device("cpu"))
    torch.testing.assert_close(l1, l2)
    assert l1.shape == (6,) and l1.requires_grad and math.isfinite(stats["residual_rms"])
    # At n = 0 (t = σ_max) X ≡ z has no gradient, yet the loss does through X' at t_1.
    z, _, _ = obj.draw(2, (3, 8, 8), 0, torch.Generator().manual_seed(0), torch.device("cpu"))
    lhs, _ = obj.residual(student, z, None, torch.tensor([0, 0]))
    assert lhs.requires_grad


def test_karras_grid_and_pairs():
    g = karras_grid(250, 0.002, 80.0)
    assert g[0].item() == pytest.approx(80.0) and g[-1].item() == pytest.approx(0.002)
    assert bool((g[1:] < g[:-1]).all())
    ratio = (g[:-1] - g[1:]) / g[:-1]  # Δt/t ≈ 0.022–0.094 for N = 250 (docs/pid.md §(c))
    assert 0.02 < ratio.min() < 0.025 and 0.09 < ratio.max() < 0.1
    assert pair_indices(torch.tensor([0, 5, 248, 249]), 250).tolist() == [1, 6, 249, 248]
    with pytest.raises(ConfigError):
        karras_grid(1, 0.002, 80.0)


def test_simple_distances():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    d = (x - y).flatten(1)
    torch.testing.assert_close(make_distance("l2")(x, y), d.square().mean(1))
    torch.testing.assert_close(make_distance("l1")(x, y), d.abs().mean(1))
    c = 0.00054 * math.sqrt(48)
    torch.testing.assert_close(make_distance("pseudo-huber")(x, y), (d.square().sum(1) + c * c).sqrt() - c)
    torch.testing.assert_close(pseudo_huber_distance(x, x, 0.5), torch.zeros(3))
    with pytest.raises(ConfigError, match="unknown distance"):
        make_distance("l3")


def test_lpips_from_local_file(tmp_path):
    vgg = write_random_vgg16(tmp_path / "vgg16.pth")
    lp = LPIPSDistance(resize=32, vgg_path=vgg)
    assert torch.equal(lp.model.net.slice3[10 - 9].weight, torch.load(vgg)["features.10.weight"])
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    d = lp(x, y)
    assert d.shape == (2,) and bool((d > 0).all()) and torch.allclose(lp(x, x), torch.zeros(2), atol=1e-6)
    up = torch.nn.functional.interpolate  # the resize is bilinear to resize×resize, before the network
    torch.testing.assert_close(d, LPIPSDistance(resize=0, vgg_path=vgg)(up(x, size=(32, 32), mode="bilinear"),
                                                                       up(y, size=(32, 32), mode="bilinear")))
    dist = make_distance(DistanceConfig("lpips", lpips_resize=32, lpips_vgg=vgg))
    x.requires_grad_(True)
    dist(x, y).sum().backward()  # gradient reaches the images (the student side)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_lpips_weights_missing_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DownloadError, match="not found.*--loss=l2"):
        load_vgg16_features(str(tmp_path / "missing.pth"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(DownloadError, match="vgg16-397923af.pth.*--lpips-vgg.*--loss=l2"):
        load_vgg16_features(None, download=False)


def test_vgg_download_is_one_process_at_a_time(tmp_path, monkeypatch):
    """A torchrun job's ranks all ask for VGG16: while one holds the cache entry's lock (downloading), another waits
    and then reads that file instead of downloading again. The download here fails if called."""
    import threading
    import torchvision
    from pid.distances import write_random_vgg16
    from pid.download import download_lock
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    calls = []
    monkeypatch.setattr(torchvision.models.VGG16_Weights.IMAGENET1K_V1.__class__, "get_state_dict",
                        lambda self, *a, **k: calls.append(1) or (_ for _ in ()).throw(OSError("offline")))
    target = tmp_path / "checkpoints" / "vgg16-397923af.pth"
    target.parent.mkdir(parents=True)
    result = {}
    with download_lock(str(target)):   # "rank 0" is downloading
        waiter = threading.Thread(target=lambda: result.update(sd=load_vgg16_features(None)))
        waiter.start()
        waiter.join(timeout=1.0)
        assert waiter.is_alive(), "the second process must wait for the lock"
        write_random_vgg16(str(target), seed=3)
    waiter.join(timeout=30)
    assert not calls and torch.equal(result["sd"]["features.0.weight"],
                                     load_vgg16_features(str(target))["features.0.weight"])
    target.unlink()
    with pytest.raises(DownloadError, match="could not be downloaded.*offline"):   # alone: it downloads, and says why not
        load_vgg16_features(None)
    assert calls


UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_under_autocast_stays_within_rounding_of_fp32(dtype):
    """On the N = 250 grid (every index once), the residual lhs − rhs under fp16/bf16 autocast stays within a
    bound derived from the format's unit roundoff u of the fp32 residual; the student under autocast does not.

    Error model: a network evaluated with unit roundoff u returns its output with an rms error of κ·u·rms(out),
    κ being how many u-sized relative errors survive to the output (measured on one teacher call, and required
    to be ≤ K = 8 here). The teacher's target is not amplified: κ·u·rms(D) ≤ K·u·rms(D). The student's two
    outputs enter lhs = X − c·(X − X') with c = t/(t − t') (≤ 46 on this grid), which multiplies their
    independent errors by up to √2·c. With the student and the difference in fp32 (residual_precision='fp32')
    that term is at most √2·c_max·K·2^-24·rms(X) (X includes the (t/T)·z term of size up to σ_max = 80), so
        tolerance = K·u·rms(D) + √2·c_max·K·2^-24·rms(X)      (1.8e-3 for fp16, 9.3e-3 for bf16 here).
    With the student under autocast ('amp', the reference's fp16 U-Net) the same term has u instead of 2^-24:
    ~√2·c·κ·u·rms(F), which must exceed 3× the tolerance, so that the bound has teeth.
    """
    u, K = UNIT_ROUNDOFF[dtype], 8
    teacher = tiny_teacher("edm")      # an EDM teacher under autocast: also checks that it runs at all
    student = student_from_teacher(teacher, "tiny")
    N = 250
    n = torch.arange(N)
    z = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 80

    def run(mode, amp):
        obj = PIDObjective(teacher, N, "l2", 0.002, 80.0, residual_precision=mode)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=amp):
            lhs, rhs = obj.residual(student, z, None, n)
            target = teacher(lhs, obj.grid[n], None)   # one plain teacher call, to measure κ
        return lhs, rhs, target, obj

    def rms(a):
        return a.double().square().mean().sqrt().item()

    lhs32, rhs32, target32, obj = run("fp32", False)
    lhs, rhs, target, _ = run("fp32", True)
    kappa = rms(target - target32) / (u * rms(target32))
    assert 0 < kappa <= K, kappa
    c_max = obj.fd_coef.abs().max().item()
    assert 40 < c_max < 50   # the amplification of the N = 250 Karras grid
    with torch.no_grad():
        x32 = student(z, obj.grid[n])   # X itself (σ_max-sized z term included): its fp32 rounding is amplified
    tolerance = K * u * rms(rhs32) + math.sqrt(2) * c_max * K * 2.0 ** -24 * rms(x32)
    err = rms((lhs - rhs) - (lhs32 - rhs32))
    assert err <= tolerance, (err, tolerance)
    torch.testing.assert_close(lhs, lhs32, rtol=0, atol=0)   # the student part is exactly the fp32 one
    lhs_amp, rhs_amp, _, _ = run("amp", True)
    err_amp = rms((lhs_amp - rhs_amp) - (lhs32 - rhs32))
    assert err_amp > 3 * tolerance, (err_amp, tolerance)


def test_residual_precision_is_checked():
    with pytest.raises(ConfigError, match="--residual-precision"):
        PIDObjective(tiny_teacher("edm"), 8, "l2", residual_precision="fp16")


def test_link_weights_choose_the_grid_indices_and_uniform_is_the_papers_draw():
    from pid.teachers import load_teacher
    teacher = load_teacher("builtin:glyphs16")
    uniform, named = PIDObjective(teacher, 6, "l2"), PIDObjective(teacher, 6, "l2", link_weights="uniform")
    weighted = PIDObjective(teacher, 6, "l2", link_weights="0,1,1,0,2,0")
    draws = {}
    for name, obj in (("uniform", uniform), ("named", named), ("weighted", weighted)):
        g = torch.Generator().manual_seed(3)
        draws[name] = obj.draw(4000, (3, 16, 16), teacher.label_dim, g, torch.device("cpu"))[2]
    g = torch.Generator().manual_seed(3)
    torch.randn((4000, 3, 16, 16), generator=g)
    torch.randint(teacher.label_dim, (4000,), generator=g)
    assert torch.equal(draws["uniform"], torch.randint(6, (4000,), generator=g))   # the reference's draw order
    assert torch.equal(draws["uniform"], draws["named"]) and "link_weights" not in uniform.config_dict()
    counts = torch.bincount(draws["weighted"], minlength=6).double() / 4000
    assert counts[[0, 3, 5]].sum() == 0 and abs(counts[4] - 0.5) < 0.04 and abs(counts[1] - 0.25) < 0.04
    assert weighted.config_dict()["link_weights"] == [0, 1, 1, 0, 2, 0]
    for bad, words in (("1,2", "N = 6"), ("a,b,c,d,e,f", "comma-separated"), ("0,0,0,0,0,0", "not all zero"),
                       ("1,1,1,1,1,-1", "non-negative"), ("1,1,1,1,1,inf", "finite")):
        with pytest.raises(ConfigError, match=words):
            PIDObjective(teacher, 6, "l2", link_weights=bad)


class _PointStudent(torch.nn.Module):
    """x(z, t) = z·t/80 + a(t)·w: a smooth trajectory with one learnable vector w, enough to follow gradients."""

    img_channels, img_resolution, label_dim = 3, 16, 10

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.3)

    def forward(self, z, t, labels=None):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return z * t / 80 + (1 - t / 80) * torch.tanh(self.w) * (1 + 0.1 * t.log())


def _draw(obj, num, seed=0):
    return obj.draw(num, (3, 16, 16), 10, torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_paper_defaults_of_the_extra_options_change_nothing():
    from pid.teachers import load_teacher
    teacher = load_teacher("builtin:glyphs16")
    plain = PIDObjective(teacher, 12, "l2", rho=1.5)
    named = PIDObjective(teacher, 12, "l2", rho=1.5, residual_grad="both", time_weight=0.0, residual_scheme="euler")
    student = _PointStudent()
    a = plain.loss(student, 64, torch.Generator().manual_seed(5), torch.device("cpu"))[0]
    b = named.loss(student, 64, torch.Generator().manual_seed(5), torch.device("cpu"))[0]
    assert torch.equal(a, b)
    assert not {"residual_grad", "time_weight", "residual_scheme"} & set(named.config_dict())


def test_residual_grad_lower_stops_the_gradient_of_the_upper_point_only():
    from pid.teachers import load_teacher
    teacher = load_teacher("builtin:glyphs16")
    both, lower = (PIDObjective(teacher, 12, "l2", rho=1.5, residual_grad=g) for g in ("both", "lower"))
    assert lower.config_dict()["residual_grad"] == "lower"
    z, labels, _ = _draw(both, 2)
    for n in (3, 10, 11):   # an inner link, the link into σ_min, and the edge index (pairs with N−2)
        idx = torch.full((2,), n)
        grads = {}
        for name, obj in (("both", both), ("lower", lower)):
            xs = {}

            class Probe(torch.nn.Module):   # records the student's outputs so that their gradients can be read
                img_channels, img_resolution, label_dim = 3, 16, 10

                def forward(self, zz, tt, ll=None):
                    out = (zz * tt.view(-1, 1, 1, 1) / 80).clone().requires_grad_(True)
                    xs["out"] = out
                    return out
            reference = both.residual(Probe(), z, labels, idx)[0]
            lhs, rhs = obj.residual(Probe(), z, labels, idx)
            assert torch.allclose(lhs, reference)   # the same values, only the gradient differs
            (lhs - rhs).square().sum().backward()
            grads[name] = xs["out"].grad.chunk(2)   # (at t_n, at t_n')
        upper_first = n < 11   # for the edge index the upper point is the pair t_{N−2}
        g_upper, g_lower = grads["lower"] if upper_first else grads["lower"][::-1]
        assert g_upper.abs().max() == 0 and g_lower.abs().max() > 0
        assert torch.allclose(g_lower, (grads["both"][1] if upper_first else grads["both"][0]))
        assert grads["both"][0].abs().max() > 0 and grads["both"][1].abs().max() > 0


def test_time_weight_scales_each_links_loss_by_a_power_of_its_coefficient():
    from pid.teachers import load_teacher
    teacher = load_teacher("builtin:glyphs16")
    student = _PointStudent()
    plain = PIDObjective(teacher, 12, "l2", rho=1.5)
    for p in (-2.0, 1.0):
        weighted = PIDObjective(teacher, 12, "l2", rho=1.5, time_weight=p)
        a = plain.loss(student, 48, torch.Generator().manual_seed(2), torch.device("cpu"))[0]
        b = weighted.loss(student, 48, torch.Generator().manual_seed(2), torch.device("cpu"))[0]
        n = _draw(plain, 48, seed=2)[2]
        c = plain.fd_coef[n].abs()
        expected = torch.where(c > 1, c ** p, torch.ones_like(c))
        assert torch.allclose(b, a * expected, rtol=1e-5)
        assert weighted.config_dict()["time_weight"] == p
    for bad in (float("nan"), 9.0):
        with pytest.raises(ConfigError, match="--time-weight"):
            PIDObjective(teacher, 12, "l2", time_weight=bad)


def test_trapezoid_target_vanishes_on_the_trapezoid_step_and_keeps_euler_into_sigma_min():
    from pid.teachers import load_teacher
    teacher = load_teacher("builtin:glyphs16")
    euler = PIDObjective(teacher, 12, "l2", rho=1.5)
    trap = PIDObjective(teacher, 12, "l2", rho=1.5, residual_scheme="trapezoid")
    assert trap.config_dict()["residual_scheme"] == "trapezoid"
    with pytest.raises(ConfigError, match="--residual-scheme"):
        PIDObjective(teacher, 12, "l2", residual_scheme="heun")
    z, labels, _ = _draw(trap, 4)
    g = trap.grid.double()
    lab = labels.double()
    for n in (2, 8):
        # X at t_n: a few Euler steps from z; X' solves X' = X + h·½(v(X, t) + v(X', t')) by fixed-point iteration
        x = z.double()
        for k in range(n):
            x = x + (g[k + 1] - g[k]) * (x - teacher(x, g[k], lab)) / g[k]
        t, t2 = g[n], g[n + 1]
        v = (x - teacher(x, t, lab)) / t
        x2 = x + (t2 - t) * v
        for _ in range(300):
            x2 = x + (t2 - t) * 0.5 * (v + (x2 - teacher(x2, t2, lab)) / t2)

        class Oracle(torch.nn.Module):
            img_channels, img_resolution, label_dim = 3, 16, 10

            def forward(self, zz, tt, ll=None):
                return torch.cat([x, x2]).float()
        idx = torch.full((4,), n)
        lhs, rhs = trap.residual(Oracle(), z, labels, idx)
        lhs_e, rhs_e = euler.residual(Oracle(), z, labels, idx)
        scale = lhs.square().mean().sqrt()
        assert (lhs - rhs).square().mean().sqrt() < 1e-4 * scale   # the trapezoid step is its fixed point
        assert (lhs_e - rhs_e).square().mean().sqrt() > 1e-3 * scale   # and not Euler's
    for n in (10, 11):   # the link into σ_min and the edge index: Euler's target, bit for bit
        idx = torch.full((4,), n)
        student = _PointStudent()
        assert torch.equal(trap.residual(student, z, labels, idx)[1], euler.residual(student, z, labels, idx)[1])
