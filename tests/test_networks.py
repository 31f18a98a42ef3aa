"""Backbones and preconditioners against EDM's own outputs (edm_vectors/<network>.pt, docs/edm.md §10-11).

Run with ``-s`` to print the worst error per file (absolute and relative to max|D|).
"""

import functools
import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from edm_networks import (EDMPrecond, NETWORK_CLASSES, PRECOND_CLASSES, SongUNet, VEPrecond, VPPrecond,
                          iDDPMPrecond, set_attention)

VECTORS = os.environ.get("PID_EDM_VECTORS", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "edm_vectors"))
RTOL = 1e-5  # edm.md §10.7: D within 1e-5 of max|D|


def _network_files() -> list:
    """Every golden network file (those with init_kwargs), found by content rather than by a fixed list."""
    names = []
    for path in sorted(glob.glob(os.path.join(VECTORS, "*.pt"))):
        if os.path.basename(path) in ("components.pt", "fid_golden.pt"):
            continue
        names.append(os.path.basename(path))
    return names or ["<no network vectors>"]


@functools.lru_cache(maxsize=2)
def _load(path: str) -> dict:
    return torch.load(path, weights_only=True)


def _vector(folder: str, name: str) -> dict:
    data = _load(os.path.join(folder, name))
    if "init_kwargs" not in data:
        pytest.skip(f"{name} is not a network vector")
    return data


def _build(data: dict) -> torch.nn.Module:
    kwargs = data["init_kwargs"]
    return PRECOND_CLASSES[kwargs["precond_class"]](**kwargs["edm_constructor_kwargs"])


def _golden_network(edm_vectors, name: str) -> tuple[dict, torch.nn.Module]:
    """(the vector file's contents, its network built with its init kwargs and golden weights, in eval mode)."""
    d = _vector(edm_vectors, name)
    net = _build(d)
    net.load_state_dict(d["state_dict"])
    return d, net.eval()


def _outputs(net: torch.nn.Module, d: dict) -> dict:
    """Our outputs for every golden output present in the vector file."""
    out = {"D": net(d["x"], d["sigma"], d["class_labels"]),
           "D_scalar_sigma": net(d["x"], d["sigma_scalar"], d["class_labels"])}
    if "D_no_labels" in d:
        out["D_no_labels"] = net(d["x"], d["sigma"], None)
    if "D_augment" in d:
        out["D_augment"] = net(d["x"], d["sigma"], d["class_labels"], augment_labels=d["augment_labels"])
    return out


@pytest.mark.parametrize("name", _network_files())
def test_forward_matches_edm(edm_vectors, name):
    d, net = _golden_network(edm_vectors, name)
    with torch.no_grad():
        outputs = _outputs(net, d)
    report = []
    for key, ours in outputs.items():
        ref = d[key]
        assert ours.shape == ref.shape and ours.dtype == torch.float32, key
        err = (ours.double() - ref.double()).abs().max().item()
        scale = ref.abs().max().item()
        report.append(f"{key} {err:.2e} abs / {err / scale:.2e} rel")
        assert err <= RTOL * scale, f"{name} {key}: max error {err:.3e} > {RTOL} * {scale:.3e}"
    print(f"\n{name}: " + ", ".join(report))


@pytest.mark.parametrize("name", _network_files())
def test_init_matches_edm(edm_vectors, name):
    """torch.manual_seed(init_seed) + construction reproduces EDM's parameters (init rules and RNG order)."""
    d = _vector(edm_vectors, name)
    kwargs = d["init_kwargs"]
    with torch.random.fork_rng():
        torch.manual_seed(kwargs["init_seed"])
        net = _build(d)
    state = net.state_dict()
    assert list(state) == list(d["init_stats"]) == list(d["state_dict"])
    for key, stats in d["init_stats"].items():
        t = state[key].double()
        assert list(t.shape) == stats["shape"], key
        assert math.isclose(t.sum().item(), stats["sum"], rel_tol=1e-6, abs_tol=1e-6), key
        assert math.isclose((t ** 2).sum().item(), stats["sumsq"], rel_tol=1e-6, abs_tol=1e-9), key
        head = torch.tensor(stats["head"], dtype=torch.float64)
        torch.testing.assert_close(t.flatten()[:len(head)], head, rtol=1e-6, atol=1e-9, msg=key)
    for attr, value in kwargs["precond_attrs"].items():
        # iDDPM's sigma_max ends a 1000-step float32 recursion: one ulp of sin() in another torch build moves it
        # by one float32 ulp (20291.169921875 vs EDM's 20291.171875 with torch 2.14.1), hence the 1e-6 tolerance.
        if isinstance(value, float):
            assert math.isclose(getattr(net, attr), value, rel_tol=1e-6, abs_tol=0), attr
        else:
            assert getattr(net, attr) == value, attr
    assert sum(p.numel() for p in net.parameters()) == d["num_params"]
    assert sum(b.numel() for b in net.buffers()) == d["num_buffer_elems"]
    assert net.init_kwargs == kwargs["edm_constructor_kwargs"]
    assert net.model.init_kwargs == kwargs["model_kwargs_effective"]


def _tiny(cls=EDMPrecond, **overrides) -> torch.nn.Module:
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=4, model_type="SongUNet", model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
    kwargs.update(overrides)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return cls(**kwargs)


def test_iddpm_noise_levels_and_rounding(edm_vectors):
    schedules = json.load(open(os.path.join(edm_vectors, "sampler_schedules.json")))["iDDPMPrecond"]
    net = iDDPMPrecond(img_resolution=8, img_channels=3, model_channels=32, channel_mult=[1], num_blocks=1,
                       attn_resolutions=[])
    assert net.u.dtype == torch.float32 and net.u.shape == (1001,)
    # Float32 recursion over 1000 steps: a one-ulp difference of sin() between torch builds (608 of the 1001
    # entries differ by an ulp or two with torch 2.14.1 on this CPU) must not fail us; 1e-6 is ~8 ulps.
    torch.testing.assert_close(net.u, torch.tensor(schedules["u"], dtype=torch.float32), rtol=1e-6, atol=0)
    assert net.sigma_min == pytest.approx(schedules["net_sigma_min"], rel=1e-6)
    assert net.sigma_max == pytest.approx(schedules["net_sigma_max"], rel=1e-6)
    assert net.state_dict()["u"].shape == (1001,)
    sigma = torch.tensor([[80.0], [0.0]], dtype=torch.float64)
    rounded = net.round_sigma(sigma)
    assert rounded.shape == sigma.shape and rounded.dtype == torch.float64
    assert rounded[0, 0].item() == pytest.approx(schedules["edm_sampler_18"]["sigmas_called"][0], rel=1e-6)
    assert rounded[1, 0].item() == 0.0
    assert net.round_sigma(sigma, return_index=True).flatten().tolist() == [8, 1000]


def test_continuous_preconditioner_constants():
    vp = _tiny(VPPrecond)
    assert (vp.sigma_min, vp.sigma_max) == (0.0009765625, 152.16697692871094)
    ve = _tiny(VEPrecond)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    edm = _tiny(EDMPrecond)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float("inf"), 0.5)
    s = torch.tensor([0.3, 2.0], dtype=torch.float64)
    assert torch.equal(edm.round_sigma(s), s)


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond, iDDPMPrecond])
def test_coefficients_reproduce_forward(cls):
    net = _tiny(cls).eval()
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 7.0]), torch.eye(4)[:2]
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma.reshape(-1, 1, 1, 1))
    with torch.no_grad():
        manual = c_skip * x + c_out * net.model(c_in * x, c_noise.flatten(), labels)[:, :3]
        assert torch.equal(manual, net(x, sigma, labels))
    if cls is EDMPrecond:
        expected_noise = sigma.log() / 4
    elif cls is VEPrecond:
        expected_noise = (sigma / 2).log()
    elif cls is VPPrecond:  # (M − 1)·t(σ) with EDM's default β_d = 19.9, β_min = 0.1
        expected_noise = 999 * ((0.1 ** 2 + 2 * 19.9 * (1 + sigma ** 2).log()).sqrt() - 0.1) / 19.9
    else:
        expected_noise = 999 - (sigma[:, None] - net.u[None, :]).abs().argmin(dim=1).float()
    torch.testing.assert_close(c_noise.flatten(), expected_noise)


def test_labels_ignored_without_label_dim_and_defaulted_with_it():
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    uncond = _tiny(label_dim=0).eval()
    with torch.no_grad():
        assert torch.equal(uncond(x, sigma, torch.eye(4)[:2]), uncond(x, sigma))
    cond = _tiny().eval()
    with torch.no_grad():
        assert torch.equal(cond(x, sigma, None), cond(x, sigma, torch.zeros(2, 4)))
        assert not torch.equal(cond(x, sigma, torch.eye(4)[:2]), cond(x, sigma, None))


def test_label_dropout_one_drops_every_label_in_training_only():
    net = _tiny(label_dropout=1.0)
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.eye(4)[:2]
    with torch.no_grad():
        net.train()
        assert torch.equal(net(x, sigma, labels), net(x, sigma, None))
        net.eval()
        assert not torch.equal(net(x, sigma, labels), net(x, sigma, None))


def test_batch_independence_and_fp16_flag_on_cpu():
    net = _tiny(use_fp16=True).eval()  # use_fp16 has no effect on CPU
    x, sigma, labels = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 1.0, 20.0]), torch.eye(4)[:3]
    with torch.no_grad():
        batch = net(x, sigma, labels)
        single = net(x[1:2], sigma[1:2], labels[1:2])
        assert batch.dtype == torch.float32
        assert torch.equal(net(x, sigma, labels, force_fp32=True), batch)
    torch.testing.assert_close(single, batch[1:2], rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_every_parameter():
    net = _tiny(model_type="DhariwalUNet", model_channels=16, attn_resolutions=[4], augment_dim=3).train()
    net(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.eye(4)[:2],
        augment_labels=torch.randn(2, 3)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_rebuild_from_init_kwargs_and_classes_table():
    net = _tiny(VPPrecond, encoder_type="skip", decoder_type="skip", embedding_type="fourier")
    rebuilt = type(net)(**net.init_kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert set(PRECOND_CLASSES) == {"VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond"}
    assert {"SongUNet", "DhariwalUNet", "UNetBlock", "Conv2d", "Linear", "GroupNorm", "PositionalEmbedding",
            "FourierEmbedding"} <= set(NETWORK_CLASSES)
    assert NETWORK_CLASSES["SongUNet"] is SongUNet


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="model_type"):
        _tiny(model_type="UNet2D")
    with pytest.raises(ValueError, match="encoder_type"):
        _tiny(encoder_type="fancy")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_preconditioner_runs_under_autocast(dtype):
    """The trainer's fp16/bf16 run teachers and students under autocast: D stays float32 and close to fp32's."""
    net = _tiny(model_type="DhariwalUNet", model_channels=16, attn_resolutions=[4]).eval()
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.eye(4)[:2]
    with torch.no_grad():
        full = net(x, sigma, labels)
        with torch.autocast("cpu", dtype=dtype):
            half = net(x, sigma, labels)
    assert half.dtype == torch.float32
    assert (half - full).abs().max().item() < 5e-2 * full.abs().max().item()


@pytest.mark.parametrize("name", _network_files())
def test_sdpa_attention_matches_edm(edm_vectors, name):
    """--attention=sdpa: the golden outputs within the same tolerance, and gradients within float32 rounding."""
    d, net = _golden_network(edm_vectors, name)
    assert set_attention(net, "sdpa") > 0, f"{name} has no attention block"
    x = d["x"].clone().requires_grad_(True)
    ours = net(x, d["sigma"], d["class_labels"])
    ref = d["D"]
    scale = ref.abs().max().item()
    assert (ours.double() - ref.double()).abs().max().item() <= RTOL * scale
    (grad_sdpa,) = torch.autograd.grad(ours.square().sum(), x)
    set_attention(net, "edm")
    (grad_edm,) = torch.autograd.grad(net(x, d["sigma"], d["class_labels"]).square().sum(), x)
    err = (grad_sdpa - grad_edm).abs().max().item()
    assert err <= RTOL * grad_edm.abs().max().item(), f"{name}: gradient error {err:.3e}"
    with pytest.raises(ValueError, match="sdpa"):
        set_attention(net, "flash")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_attention_fp16_on_cuda_close_to_edm():
    """On CUDA in fp16 SDPA runs the softmax in half precision (EDM's AttentionOp in float32): documented 2e-2."""
    net = _tiny(use_fp16=True, model_type="DhariwalUNet", model_channels=64, attn_resolutions=[8, 4]).cuda().eval()
    x, sigma = torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([0.5, 3.0], device="cuda")
    with torch.no_grad():
        edm = net(x, sigma, None)
        set_attention(net, "sdpa")
        sdpa = net(x, sigma, None)
    assert (sdpa - edm).abs().max().item() < 2e-2 * edm.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 path runs only on CUDA")
def test_fp16_on_cuda_close_to_fp32():
    net = _tiny(use_fp16=True, model_type="DhariwalUNet", model_channels=64, attn_resolutions=[8, 4]).cuda().eval()
    x, sigma = torch.randn(2, 3, 8, 8, device="cuda"), torch.tensor([0.5, 3.0], device="cuda")
    with torch.no_grad():
        half = net(x, sigma, None)
        full = net(x, sigma, None, force_fp32=True)
    assert half.dtype == full.dtype == torch.float32
    assert (half - full).abs().max().item() < 2e-2 * full.abs().max().item()


def test_import_edm_networks_is_light():
    code = ("import sys, edm_networks; bad = [m for m in ('pid', 'torchvision', 'lpips') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("model_type", ["SongUNet", "DhariwalUNet"])
def test_output_layers_run_in_fp32_under_autocast(model_type):
    """Under autocast the backbone's output layers run in fp32 (as the fp16 U-Nets of guided diffusion keep
    their `out` layers): the output is float32, and the preconditioner accepts it (EDM's dtype check)."""
    kw = {"attn_resolutions": [4]} if model_type == "SongUNet" else {"attn_resolutions": [4], "model_channels": 16}
    net = _tiny(model_type=model_type, **kw).eval()
    with torch.no_grad():
        for p in net.model.parameters():   # the output conv is zero-initialised: give it weights
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.eye(4)[:2]
    with torch.no_grad():
        full = net(x, sigma, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inner = net.model(x, sigma.log() / 4, class_labels=labels)
            half = net(x, sigma, labels)
    assert inner.dtype == half.dtype == torch.float32
    assert (half - full).abs().max().item() < 0.05 * full.abs().max().item()
