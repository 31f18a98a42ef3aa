"""The shipped network teacher builtin:glyphs16-net: an ordinary EDM pickle, a trained denoiser, the EDM path."""

import hashlib
import os
import shutil

import pytest
import torch

import edm_networks
import pid.teachers as teachers
from pid.errors import CheckpointError, ConfigError
from pid.make_teacher import TEACHER_NETWORKS, build_teacher_network, denoiser_error
from pid.teachers import EDMTeacher, builtin_network_path, load_teacher
from pid.toy import builtin_teacher

# Relative denoiser error at each σ: RMS(D_net − D_exact) / RMS(x − D_exact), the error against the correction
# the denoiser has to make. The shipped file measured 0.077, 0.047, 0.016, 0.013 at these σ (BENCHMARKS.md,
# "Network teacher"); an untrained network of the same architecture is at 1.1 and 1.0 at the two smallest.
SIGMAS = (0.05, 0.2, 1.0, 5.0)
BOUND = 0.25


def _relative_errors(net, mixture):
    errs = denoiser_error(net, mixture, sigmas=SIGMAS, num=300, seed=7)
    return {s: v["rms_error"] / v["rms_correction"] for s, v in errs.items()}


def test_loads_through_the_safe_loader_as_an_edm_pickle():
    path = builtin_network_path("glyphs16-net")
    data = edm_networks.load_network_pickle(path)
    assert isinstance(data["ema"], edm_networks.EDMPrecond)
    assert type(data["ema"].model).__name__ == "DhariwalUNet"
    teacher = load_teacher("builtin:glyphs16-net")
    assert isinstance(teacher, EDMTeacher) and teacher.net.model is not None
    assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (16, 3, 10)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert teacher.data_distribution.name == "builtin:glyphs16"
    # the denoiser is the network: its output is the preconditioner's, not the mixture's
    x, labels = torch.randn(4, 3, 16, 16), torch.eye(10)[:4]
    torch.testing.assert_close(teacher(x, 1.0, labels), data["ema"](x, torch.ones(4), labels))
    assert not torch.allclose(teacher(x, 1.0, labels), teacher.data_distribution(x, 1.0, labels).float(), atol=1e-3)
    assert os.path.getsize(path) < 16 * 2 ** 20


def test_denoiser_is_close_to_the_exact_one_and_an_untrained_network_is_not():
    mixture = builtin_teacher("glyphs16")
    shipped = _relative_errors(load_teacher("builtin:glyphs16-net").net, mixture)
    assert max(shipped.values()) < BOUND, shipped
    untrained = build_teacher_network(TEACHER_NETWORKS["glyphs16"], 16, 3, 10, seed=3).eval()
    with torch.no_grad():  # EDM's zero-initialised output layer makes D = c_skip·x: perturb it like a broken file
        for p in untrained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert max(_relative_errors(untrained, mixture).values()) > BOUND


def test_a_changed_file_is_refused_with_the_fix(tmp_path, monkeypatch):
    assets = tmp_path / "assets"
    shutil.copytree(teachers.ASSETS, assets)
    with open(assets / "glyphs16-net.pkl", "r+b") as f:
        f.seek(200)
        f.write(b"\x00")
    monkeypatch.setattr(teachers, "ASSETS", str(assets))
    with pytest.raises(CheckpointError, match="sha256.*restore it"):
        load_teacher("builtin:glyphs16-net")


def test_sha256sums_match_the_shipped_files():
    with open(os.path.join(teachers.ASSETS, "SHA256SUMS"), encoding="utf-8") as f:
        rows = [line.split() for line in f if line.strip()]
    assert {name for _, name in rows} == {file for file, _ in teachers.BUILTIN_NETWORKS.values()}
    for digest, name in rows:
        with open(os.path.join(teachers.ASSETS, name), "rb") as g:
            assert hashlib.sha256(g.read()).hexdigest() == digest


def _dry_run(module, args):
    from click.testing import CliRunner
    result = CliRunner().invoke(module.main, args + ["--dry-run"])
    assert result.exit_code == 0, result.output
    return dict(line.split(" = ", 1) for line in result.output.strip().splitlines())


def test_the_network_teacher_gets_its_recipe_and_options_still_win():
    import train_mm
    import train_pid
    from pid.methods.mm import recipes as mm
    from pid.methods.pid import recipes as pid_recipes
    for module, recipes in ((train_pid, pid_recipes), (train_mm, mm)):
        opts = _dry_run(module, ["--teacher=builtin:glyphs16-net"])
        for key, value in recipes.TEACHER_RECIPES["builtin:glyphs16-net"].items():
            assert opts[key] == str(value), key
        assert _dry_run(module, ["--teacher=builtin:glyphs16-net", "--lr=0.125"])["lr"] == "0.125"
        assert _dry_run(module, [])["lr"] == str(recipes.DEFAULT_RECIPE["lr"])   # the analytic teacher keeps its own
    alg3 = ["--teacher=builtin:glyphs16-net", "--algorithm=parameter"]
    assert _dry_run(train_mm, alg3)["lr"] == str(mm.ALGORITHM_RECIPES[("builtin:glyphs16-net", "parameter")]["lr"])
    assert _dry_run(train_mm, alg3)["steps"] == "1000"
    assert _dry_run(train_mm, [*alg3, "--lr=0.125"])["lr"] == "0.125"
    assert _dry_run(train_mm, ["--algorithm=parameter"])["lr"] == str(mm.DEFAULT_RECIPE["lr"])


@pytest.mark.parametrize("script,extra", [
    ("train_pid", ["--discretization=4"]),
    ("train_mm", ["--k=2"]),
    ("train_mm", ["--k=2", "--algorithm=parameter"]),
])
def test_every_method_runs_through_the_edm_path_with_exact_scores(tmp_path, script, extra):
    """A copied U-Net as the trainable network(s), exact mixture data, exact scores: as a user's EDM teacher."""
    import importlib
    import json
    from click.testing import CliRunner
    module = importlib.import_module(script)
    args = [f"--outdir={tmp_path}", "--teacher=builtin:glyphs16-net", "--steps=2", "--batch=4", "--grid-every=0",
            "--log-every=1", "--eval-every=2", "--eval-num=4", "--snap=2", *extra]
    result = CliRunner().invoke(module.main, args)
    assert result.exit_code == 0, result.output
    (run,) = os.listdir(tmp_path)
    metrics = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
    assert metrics[-1]["step"] == 2
    key = "rmse" if script == "train_pid" else "fd_exact"
    assert key in metrics[-1] and metrics[-1][key] > 0
    from pid.training.checkpoint import read_student_checkpoint
    spec = read_student_checkpoint(str(tmp_path / run / "student-0000002.pt"))["spec"]
    kind = spec["network"]["class"] if script == "train_pid" else spec["denoiser"]["kind"]
    assert kind == ("DhariwalUNet" if script == "train_pid" else "edm")   # the teacher's network, copied


def test_baseline_table_scores_the_network_against_its_mixture_and_its_own_ode(tmp_path):
    import sys
    from click.testing import CliRunner
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    import mm_teacher_baselines
    cache = tmp_path / "ref.pt"
    args = ["--teacher=builtin:glyphs16-net", "--num=4", "--seed0=1000000", "--ode", "--ref-steps=8",
            f"--ref-cache={cache}", "--heun-steps=8", "--ancestral-steps=2", "--batch=4"]
    first = CliRunner().invoke(mm_teacher_baselines.main, args)
    assert first.exit_code == 0, first.output
    assert "seeds 1000000-1000003" in first.output and "RMSE to ODE" in first.output
    def ode_rmse(output):
        row = next(line for line in output.splitlines() if line.startswith("| Heun, 8 steps"))
        return float(row.split("|")[6])

    # Heun with the reference's own steps is the reference, up to the clamp to [-1, 1] of saved images
    assert ode_rmse(first.output) < 0.01
    saved = torch.load(cache, weights_only=True)
    assert saved["endpoints"].shape == (4, 3, 16, 16)
    torch.save(dict(saved, endpoints=saved["endpoints"] + 1), cache)   # the cache is read, not recomputed
    assert ode_rmse(CliRunner().invoke(mm_teacher_baselines.main, args).output) > 0.9


def test_student_init_copies_a_network_into_the_student_of_a_teacher_without_one():
    """--student-init: the analytic teacher's PID student starts from an EDM network's U-Net and weights."""
    from pid.methods.pid.student import build_student_from_spec, student_from_teacher
    analytic, net = load_teacher("builtin:glyphs16"), load_teacher("builtin:glyphs16-net")
    student = student_from_teacher(analytic, "builtin:glyphs16", init="builtin:glyphs16-net")
    src = net.net.model.state_dict()
    assert student.network["class"] == type(net.net.model).__name__
    assert all(torch.equal(v.float(), src[k].float()) for k, v in student.net.state_dict().items())
    assert student.noise.kind == "edm" and student.label_dim == analytic.label_dim
    rebuilt = build_student_from_spec(student.export_spec())
    rebuilt.load_state_dict(student.state_dict())
    z = torch.randn(2, 3, 16, 16) * 80
    labels = torch.eye(analytic.label_dim)[[0, 3]]
    assert torch.equal(rebuilt(z, 2.0, labels), student(z, 2.0, labels))
    random = student_from_teacher(analytic, "builtin:glyphs16")   # without: the random preset
    assert not torch.equal(next(iter(random.net.state_dict().values())), next(iter(student.net.state_dict().values())))


def test_student_init_of_another_format_or_without_a_network_is_refused(tmp_path):
    import edm_networks
    from edm_networks.pickle_writer import snapshot_bytes
    from pid.methods.pid.student import student_from_teacher
    analytic = load_teacher("builtin:glyphs16")
    torch.manual_seed(0)
    other = edm_networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_type="DhariwalUNet",
                                    model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = tmp_path / "other.pkl"
    path.write_bytes(snapshot_bytes(other))
    with pytest.raises(ConfigError, match="img_resolution 8, the teacher 16"):
        student_from_teacher(analytic, "builtin:glyphs16", init=str(path))
    with pytest.raises(ConfigError, match="not an EDM network"):
        student_from_teacher(analytic, "builtin:glyphs16", init="builtin:glyphs32")
    with pytest.raises(ConfigError, match="give one of them"):
        student_from_teacher(analytic, "builtin:glyphs16", preset="tiny", init="builtin:glyphs16-net")
