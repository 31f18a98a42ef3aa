"""Samplers, per-seed RNG and image conversion against EDM's golden data (edm_vectors) and EDM's rules."""

import glob
import json
import math
import os

import pytest
import torch

import edm_networks
from pid.errors import ConfigError
from pid.images import image_path, to_uint8
from pid.samplers import ablation_sampler, ancestral_sampler, edm_sampler, karras_sigmas, ve_posterior
from pid.seeds import StackedRandomGenerator, parse_seeds, split_seeds


class RecordingNet(torch.nn.Module):
    """Stand-in denoiser with a preconditioner's σ range and rounding; records every σ it is called with."""

    def __init__(self, sigma_min, sigma_max, round_fn=None):
        super().__init__()
        self.sigma_min, self.sigma_max, self.calls, self.round_fn = sigma_min, sigma_max, [], round_fn

    def round_sigma(self, sigma):
        return self.round_fn(sigma) if self.round_fn is not None else torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        self.calls.append(float(sigma))
        return torch.zeros_like(x)


def _golden_paths(folder):
    paths = sorted(glob.glob(os.path.join(folder, "*unet_*.pt")))
    assert len(paths) == 11, "expected the 11 golden network vectors"
    return paths


def _golden_net(path):
    data = torch.load(path, weights_only=True)
    kwargs = data["init_kwargs"]
    net = getattr(edm_networks, kwargs["precond_class"])(**kwargs["edm_constructor_kwargs"])
    net.load_state_dict(data["state_dict"])
    return net.eval().requires_grad_(False), data


def _golden_inputs(net, data):
    """Latents and labels drawn as generate.py does, plus the generator stack left in EDM's state."""
    rnd = StackedRandomGenerator("cpu", data["sampler_seeds"])
    n, res = len(data["sampler_seeds"]), net.img_resolution
    latents = rnd.randn([n, net.img_channels, res, res])
    labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[n])] if net.label_dim else None
    return rnd, latents, labels


def test_golden_sampler_outputs(edm_vectors):
    """edm_sampler (deterministic, stochastic) and ablation_sampler reproduce EDM on all 11 networks."""
    for path in _golden_paths(edm_vectors):
        net, data = _golden_net(path)
        cases = [("sampler_out", edm_sampler, data["sampler_kwargs"]),
                 ("sampler_stoch_out", edm_sampler, data["sampler_stoch_kwargs"]),
                 ("ablation_out", ablation_sampler, data["ablation_kwargs"])]
        for key, sampler, kwargs in cases:
            rnd, latents, labels = _golden_inputs(net, data)
            assert torch.equal(latents, data["latents"])
            if labels is not None:
                assert torch.equal(labels, data["sampler_class_labels"])
            with torch.no_grad():
                out = sampler(net, latents, labels, randn_like=rnd.randn_like, **kwargs)
            ref = data[key]
            assert out.dtype == torch.float64
            # 1e-4 on outputs of order 1; the VP/VE/iDDPM nets with random weights output values up to ~500,
            # where float32 rounding inside the net alone gives ~1e-7 relative.
            tol = 1e-4 * max(1.0, float(ref.abs().max()))
            err = float((out - ref).abs().max())
            assert err < tol, f"{os.path.basename(path)} {key}: max error {err:.3g} > {tol:.3g}"
            if key == "sampler_out":
                diff = (to_uint8(out).int() - data["sampler_images_uint8"].int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def test_golden_sigmas_called(edm_vectors):
    """The σ values passed to the net match EDM's for each golden network (8-step runs)."""
    for path in _golden_paths(edm_vectors):
        data = torch.load(path, weights_only=True)
        net, _ = _golden_net(path)
        wrapped = RecordingNet(net.sigma_min, net.sigma_max, round_fn=net.round_sigma)
        for key, sampler, kwargs in [("sampler_sigmas_called", edm_sampler, data["sampler_kwargs"]),
                                     ("sampler_stoch_sigmas_called", edm_sampler, data["sampler_stoch_kwargs"]),
                                     ("ablation_sigmas_called", ablation_sampler, data["ablation_kwargs"])]:
            wrapped.calls.clear()
            sampler(wrapped, torch.zeros(1, 3, 2, 2), **kwargs)
            assert wrapped.calls == pytest.approx(data[key], rel=1e-9), f"{os.path.basename(path)} {key}"


def test_schedules_of_every_preconditioner(edm_vectors):
    """18, 40 and 256-with-churn steps and the ablation settings, with each preconditioner's σ range and rounding."""
    with open(os.path.join(edm_vectors, "sampler_schedules.json")) as f:
        schedules = json.load(f)
    tiny = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    for precond, entries in schedules.items():
        real = getattr(edm_networks, precond)(8, 1, **tiny)  # only for sigma_min/max and round_sigma
        # rel 1e-6: iDDPM's levels end a float32 recursion whose last ulp depends on the torch build (test_networks)
        assert math.isclose(float(real.sigma_min), entries["net_sigma_min"], rel_tol=1e-6)
        assert math.isclose(float(real.sigma_max), entries["net_sigma_max"], rel_tol=1e-6)
        if "u" in entries:  # the sampler is under test here, not the table: use EDM's own iDDPM levels
            real.u.copy_(torch.tensor(entries["u"], dtype=torch.float32))
            real.sigma_min, real.sigma_max = entries["net_sigma_min"], entries["net_sigma_max"]
        for name, entry in entries.items():
            if not isinstance(entry, dict):
                continue
            net = RecordingNet(real.sigma_min, real.sigma_max, round_fn=real.round_sigma)
            sampler = ablation_sampler if name.startswith("ablation") else edm_sampler
            sampler(net, torch.zeros(1, 1, 1, 1), **entry["kwargs"])
            assert net.calls == pytest.approx(entry["sigmas_called"], rel=1e-9), f"{precond} {name}"


def test_karras_sigmas():
    sigmas = karras_sigmas(18)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (18,)
    assert float(sigmas[0]) == 80.0 and float(sigmas[-1]) == pytest.approx(0.002, rel=1e-12)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    # EDM eq. 5: σ_i^(1/ρ) is linear in i
    root = sigmas ** (1 / 7)
    assert torch.allclose(root[1:] - root[:-1], (root[1] - root[0]).expand(17), rtol=1e-9)
    assert karras_sigmas(1, sigma_max=5.0).tolist() == pytest.approx([5.0], rel=1e-12)


def test_nfe_and_no_last_correction():
    """Heun with N steps calls the net 2N-1 times; the range is clipped to the net's own σ range."""
    for steps in (1, 2, 5):
        net = RecordingNet(0.0, float("inf"))
        edm_sampler(net, torch.zeros(1, 1, 2, 2), num_steps=steps)
        assert len(net.calls) == 2 * steps - 1
        assert net.calls[-1] == pytest.approx(karras_sigmas(steps)[-1].item())
    net = RecordingNet(0.02, 50.0)
    edm_sampler(net, torch.zeros(1, 1, 2, 2), num_steps=4)
    assert net.calls[0] == 50.0 and net.calls[-1] == pytest.approx(0.02)


def test_deterministic_sampler_solves_gaussian_ode_exactly_in_the_limit():
    """For data N(0, s²), D(x;σ) = s²/(s²+σ²)x and the ODE endpoint is z·s; Heun converges to it."""
    s = 0.5

    class Gauss(RecordingNet):
        def forward(self, x, sigma, class_labels=None):
            return s ** 2 / (s ** 2 + torch.as_tensor(sigma) ** 2) * x

    z = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = z * 80 * s / math.hypot(80, s)
    errors = [float((edm_sampler(Gauss(0.0, 80.0), z, num_steps=n) - exact).abs().max()) for n in (32, 64, 128)]
    assert errors[0] > 3 * errors[1] > 9 * errors[2] and errors[2] < 2e-3  # second order in the step size


def test_parse_seeds():
    assert parse_seeds("0-3,7,10-11") == [0, 1, 2, 3, 7, 10, 11]
    assert parse_seeds("5,5,1") == [5, 5, 1]
    for bad in ("", "a", "1-", "-3", "3-1", "1,,2", "1.5"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


def test_split_seeds_like_edm():
    seeds = list(range(10))
    batches = split_seeds(seeds, 4)
    assert [len(b) for _, b in batches] == [4, 3, 3]
    per_rank = [split_seeds(seeds, 2, rank, 2) for rank in range(2)]
    assert sorted(i for r in per_rank for i, _ in r) == list(range(6))  # ceil(10/4)*2 = 6 batches
    merged = dict(p for r in per_rank for p in r)
    assert [s for i in sorted(merged) for s in merged[i]] == seeds
    assert [i for i, _ in per_rank[1]] == [1, 3, 5]
    with pytest.raises(ConfigError):
        split_seeds(seeds, 0)


def test_stacked_generator_is_batch_independent():
    """A seed's draws (latents, label, per-step noise) do not depend on the other seeds in its batch."""
    def draws(seeds):
        rnd = StackedRandomGenerator("cpu", seeds)
        lat = rnd.randn([len(seeds), 3, 4, 4])
        lab = rnd.randint(10, size=[len(seeds)])
        noise = rnd.randn_like(torch.zeros(len(seeds), 3, 4, 4, dtype=torch.float64))
        return lat, lab, noise
    whole = draws([3, 4, 5, 6])
    parts = [draws([3, 4]), draws([5, 6])]
    for k in range(3):
        assert torch.equal(whole[k], torch.cat([parts[0][k], parts[1][k]]))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(whole[0][2], torch.randn([3, 4, 4], generator=g))  # EDM order: latents first
    assert whole[2].dtype == torch.float64
    with pytest.raises(ValueError):
        StackedRandomGenerator("cpu", [1, 2]).randn([3, 1])


def test_ancestral_sampler_is_per_seed():
    """Moment matching's sampler with per-seed noise: a seed's image does not depend on its batch."""
    from pid.toy import GaussianMixtureTeacher
    g = torch.Generator().manual_seed(0)
    teacher = GaussianMixtureTeacher(torch.rand([4, 3, 4, 4], generator=g, dtype=torch.float64) * 2 - 1,
                                     torch.tensor([0, 0, 1, 1]), std=0.1, label_dim=2)

    def images(seeds, k):
        rnd = StackedRandomGenerator("cpu", seeds)
        latents = rnd.randn([len(seeds), 3, 4, 4])
        labels = torch.eye(2)[rnd.randint(2, size=[len(seeds)])]
        return ancestral_sampler(teacher, latents, labels, randn_like=rnd.randn_like, num_steps=k)
    for k in (1, 2, 5):
        whole = images([3, 4, 5, 6, 7], k)
        assert whole.dtype == torch.float64
        assert torch.equal(whole, torch.cat([images([3, 4], k), images([5], k), images([6, 7], k)]))
    assert not torch.allclose(images([3], 5), images([3], 2))  # the noise and the grid matter


def test_ve_posterior_reproduces_the_forward_process():
    """x fixed, z_t ~ N(x, σ_t²), z_s ~ q(z_s | z_t, x): the pair must have the forward process's joint law,
    z_s = x + σ_s ε1, z_t = z_s + sqrt(σ_t² − σ_s²) ε2, i.e. Var z_s = σ_s², Cov(z_s, z_t) = σ_s², Var z_t = σ_t²."""
    n, sigma_s, sigma_t = 50000, 0.7, 1.9
    g = torch.Generator().manual_seed(1)
    x = torch.tensor([0.3, -1.2, 0.8, 0.0], dtype=torch.float64).reshape(1, 1, 2, 2).expand(n, -1, -1, -1)
    z_t = x + sigma_t * torch.randn(x.shape, generator=g, dtype=torch.float64)
    mean, std = ve_posterior(z_t, x, sigma_t, sigma_s)
    per_sample = ve_posterior(z_t, x, torch.full([n], sigma_t, dtype=torch.float64),
                              torch.full([n], sigma_s, dtype=torch.float64))
    torch.testing.assert_close(per_sample[0], mean, rtol=1e-15, atol=1e-15)
    assert per_sample[1].shape == (n, 1, 1, 1) and torch.allclose(per_sample[1], std.expand(n, 1, 1, 1))
    z_s = mean + std * torch.randn(x.shape, generator=g, dtype=torch.float64)
    a, b = (z_s - x).flatten(), (z_t - x).flatten()  # 4 pixels, iid given x: pool them
    m = a.numel()
    # standard errors for Gaussian pairs: mean σ/√m; variance σ²·√(2/m); covariance √((σ_s²σ_t² + σ_s⁴)/m)
    assert abs(a.mean()) < 5 * sigma_s / m ** 0.5 and abs(b.mean()) < 5 * sigma_t / m ** 0.5
    assert abs(a.var() - sigma_s ** 2) < 5 * sigma_s ** 2 * (2 / m) ** 0.5
    assert abs(b.var() - sigma_t ** 2) < 5 * sigma_t ** 2 * (2 / m) ** 0.5
    cov = ((a - a.mean()) * (b - b.mean())).mean()
    cov_tol = 5 * ((sigma_s ** 2 * sigma_t ** 2 + sigma_s ** 4) / m) ** 0.5
    assert abs(cov - sigma_s ** 2) < cov_tol < 0.02  # tight enough to reject e.g. r = σ_s/σ_t (cov 1.33 vs 0.49)
    # the edges: σ_s → 0 returns x exactly; σ_s = σ_t returns z_t with no noise
    torch.testing.assert_close(ve_posterior(z_t, x, sigma_t, 0.0)[0], x)
    same = ve_posterior(z_t, x, sigma_t, sigma_t)
    torch.testing.assert_close(same[0], z_t)
    assert float(same[1]) == 0.0


def test_uint8_conversion_and_paths():
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 3.0, 72.9 / 127.5]).reshape(1, 1, 1, 6)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255, 200]  # truncation, not rounding
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)
    assert image_path("out", 1001, subdirs=True) == os.path.join("out", "001000", "001001.png")
    assert image_path("out", 7) == os.path.join("out", "000007.png")
