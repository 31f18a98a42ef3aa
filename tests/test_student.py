"""PID student: parametrization, the teacher's own c_noise, weight copy, generation, spec and checkpoint round trip."""

import json
import math

import pytest
import torch

import edm_networks
from pid.errors import CheckpointError, ConfigError
from pid.methods.pid.student import (PIDStudent, build_student_from_spec, is_student_checkpoint, load_student,
                         student_from_teacher)
from pid.student_presets import PRESETS
from pid.teachers import EDMTeacher, load_teacher

TINY = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.13)
PRECONDS = {"EDMPrecond": ("SongUNet", {}), "VPPrecond": ("SongUNet", {}), "VEPrecond": ("SongUNet", {}),
            "iDDPMPrecond": ("DhariwalUNet", {})}


def make_teacher(precond: str, label_dim: int = 0) -> EDMTeacher:
    torch.manual_seed(0)
    model_type, extra = PRECONDS[precond]
    kw = dict(TINY) if model_type == "SongUNet" else dict(model_channels=16, channel_mult=[1, 2], num_blocks=1,
                                                          attn_resolutions=[4], dropout=0.1)
    net = getattr(edm_networks, precond)(img_resolution=8, img_channels=3, label_dim=label_dim,
                                         model_type=model_type, **kw, **extra)
    with torch.no_grad():  # EDM zero-initialises output layers; perturb so that outputs depend on the inputs
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return EDMTeacher(net.eval().requires_grad_(False), f"tiny-{precond}")


def captured_noise_labels(model: torch.nn.Module, call) -> torch.Tensor:
    """Run `call()` and return the noise labels the U-Net `model` was given."""
    seen = []
    handle = model.register_forward_hook(lambda m, args, out: seen.append(args[1].detach().clone()))
    try:
        call()
    finally:
        handle.remove()
    return seen[-1]


@pytest.mark.parametrize("precond", list(PRECONDS))
def test_student_uses_the_teachers_noise_conditioning(precond):
    teacher = make_teacher(precond)
    student = student_from_teacher(teacher, "tiny")
    sigma = torch.tensor([0.002, 0.05, 1.0, 7.5, 80.0])
    if precond == "iDDPMPrecond":  # its c_noise is an index into its own σ table: query exactly those levels
        sigma = teacher.net.u[[999, 900, 500, 100, 10]]
        torch.testing.assert_close(student.noise.u, teacher.net.u)
    x = torch.randn(5, 3, 8, 8)
    want = captured_noise_labels(teacher.net.model, lambda: teacher(x, sigma))
    got = captured_noise_labels(student.net, lambda: student(x, sigma))
    torch.testing.assert_close(got, want.float().flatten(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("precond", ["EDMPrecond", "VPPrecond"])
def test_parametrization_weights_and_boundary(precond):
    teacher = make_teacher(precond, label_dim=4)
    student = student_from_teacher(teacher, "tiny")
    tsd = teacher.net.model.state_dict()
    assert student.net.state_dict().keys() == tsd.keys()
    assert all(torch.equal(v, tsd[k]) for k, v in student.net.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())
    with torch.no_grad():  # a deep copy: training the student must not touch the teacher
        next(student.parameters()).add_(1.0)
    assert not torch.equal(next(student.parameters()), next(teacher.net.model.parameters()))
    # Dropout is off in the student (the reference trains it with dropout 0), even in train mode.
    T = student.sigma_max
    assert T == 80.0 and student.sigma_min == pytest.approx(0.002)
    z = T * torch.randn(3, 3, 8, 8)
    y = torch.eye(4)[[0, 2, 3]]
    student.train()
    torch.testing.assert_close(student(z, torch.full((3,), 3.0), y), student(z, torch.full((3,), 3.0), y))
    # x_θ(z, T) = z exactly; in between: (t/T)·z + (1 − t/T)·F(c_in·z, c_noise(t), y).
    torch.testing.assert_close(student(z, T, y), z)
    t = torch.tensor([0.002, 1.0, 40.0])
    c_in = 1 / math.sqrt(0.5 ** 2 + T ** 2)
    F = student.net(c_in * z, student.noise(t), class_labels=y)
    s = (t / T).view(-1, 1, 1, 1)
    torch.testing.assert_close(student(z, t, y), s * z + (1 - s) * F)


def test_generate_is_one_call_at_sigma_min_and_clamped():
    teacher = make_teacher("EDMPrecond")
    student = student_from_teacher(teacher, "tiny").eval()
    calls = []
    student.net.register_forward_hook(lambda *a: calls.append(1))
    latents = torch.randn(4, 3, 8, 8)
    img = student.generate(latents)
    assert len(calls) == 1 and img.shape == latents.shape
    assert float(img.abs().max()) <= 1.0
    torch.testing.assert_close(img, student(latents * 80.0, 0.002).clamp(-1, 1))


def test_spec_round_trip_and_checkpoint(tmp_path):
    from pid.training.checkpoint import write_student_checkpoint
    teacher = make_teacher("VEPrecond", label_dim=4)
    student = student_from_teacher(teacher, "tiny-ve")
    spec = student.export_spec()
    spec = json.loads(json.dumps(spec))  # must be JSON-able
    assert spec["noise"]["kind"] == "ve" and spec["network"]["class"] == "SongUNet"
    assert spec["network"]["kwargs"]["dropout"] == 0.0 and spec["teacher"] == "tiny-ve"
    rebuilt = build_student_from_spec(spec)
    rebuilt.load_state_dict(student.state_dict())
    z, y = 80 * torch.randn(2, 3, 8, 8), torch.eye(4)[[1, 3]]
    torch.testing.assert_close(rebuilt(z, 0.5, y), student(z, 0.5, y))
    path = str(tmp_path / "student-000010.pt")
    ema = {k: v + 0.01 for k, v in student.state_dict().items()}
    write_student_checkpoint(path, spec, {"0.999": ema, "raw": student.state_dict()}, "0.999", 10)
    assert is_student_checkpoint(path) and not is_student_checkpoint(str(tmp_path / "nothing.pt"))
    loaded = load_student(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.state_dict()["net.enc.8x8_conv.weight"], ema["net.enc.8x8_conv.weight"])
    torch.testing.assert_close(load_student(path, ema="raw").generate(z / 80, y), student.eval().generate(z / 80, y))
    with pytest.raises(CheckpointError, match="no EMA '0.5'.*0.999, raw"):
        load_student(path, ema="0.5")
    with pytest.raises(CheckpointError):
        build_student_from_spec({"class": "Other"})


def test_preset_student_for_builtin_teacher():
    teacher = load_teacher("builtin:glyphs16")
    a = student_from_teacher(teacher, "builtin:glyphs16", preset="tiny", seed=1)
    b = student_from_teacher(teacher, "builtin:glyphs16", preset="tiny", seed=1)
    c = student_from_teacher(teacher, "builtin:glyphs16", preset="tiny", seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert a.label_dim == teacher.label_dim and a.img_resolution == 16 and a.noise.kind == "edm"
    out = a.generate(torch.randn(2, 3, 16, 16), torch.eye(10)[[0, 1]])
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match="unknown student preset"):
        student_from_teacher(teacher, preset="huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_student_preset_builds_and_round_trips(name):
    res = 32 if name.startswith("glyphs32") else 16
    teacher = load_teacher(f"builtin:glyphs{res}")
    student = student_from_teacher(teacher, f"builtin:glyphs{res}", preset=name, seed=3)
    spec = json.loads(json.dumps(student.export_spec()))
    assert spec["network"]["class"] == PRESETS[name]["class"] and spec["network"]["preset"] == name
    assert type(student.net).__name__ == PRESETS[name]["class"]
    rebuilt = build_student_from_spec(spec)
    rebuilt.load_state_dict(student.state_dict())
    z, y = torch.randn(2, 3, res, res), torch.eye(teacher.label_dim)[[0, 5]]
    torch.testing.assert_close(rebuilt.eval().generate(z, y), student.eval().generate(z, y))


def test_builtin_teachers_default_to_their_glyph_preset():
    teacher = load_teacher("builtin:glyphs16")
    student = student_from_teacher(teacher, "builtin:glyphs16")
    assert student.export_spec()["network"]["preset"] == "glyphs16"
    assert type(student.net).__name__ == "DhariwalUNet"
