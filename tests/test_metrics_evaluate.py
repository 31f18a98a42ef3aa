"""pid.metrics.evaluate: the training-time evaluator (FID/IS on fixed seeds, exact metrics for analytic teachers)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pid.exact_eval
from metrics_helpers import TinyInception, save_torchscript
from pid.errors import CheckpointError, ConfigError
from pid.metrics import ImageSet, compute_statistics, load_detector, save_stats
from pid.metrics.evaluate import make_evaluator, seed_inputs
from pid.samplers import ancestral_sampler
from pid.toy import GaussianMixtureTeacher


class ToyStudent(torch.nn.Module):
    """A 'student' with the student API: generate(latents, labels) -> images in [-1, 1]."""

    def __init__(self, scale: float = 0.5, label_dim: int = 0, channels: int = 3, res: int = 8):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(scale))
        self.label_dim, self.img_channels, self.img_resolution = label_dim, channels, res
        self.calls = []

    def generate(self, latents, class_labels=None):
        self.calls.append((latents.shape[0], None if class_labels is None else class_labels.argmax(1).tolist()))
        return torch.tanh(latents * self.scale)


def teacher_for_tests():
    g = torch.Generator().manual_seed(0)
    means = torch.rand([4, 3, 4, 4], generator=g, dtype=torch.float64) * 2 - 1
    return GaussianMixtureTeacher(means, torch.tensor([0, 0, 1, 1]), std=0.1, label_dim=2)


class OracleStudent(torch.nn.Module):
    """Returns the teacher's own reference endpoints (+ offset): with offset 0 exact metrics must be perfect."""

    def __init__(self, teacher, offset: float = 0.0):
        super().__init__()
        self.teacher, self.offset = teacher, offset
        self.label_dim, self.img_channels, self.img_resolution = 2, 3, 4

    def generate(self, latents, class_labels=None):
        return pid.exact_eval.reference_endpoints(self.teacher, latents, class_labels, num_steps=64) + self.offset


class AncestralGenerator(torch.nn.Module):
    """A stochastic generator: the analytic teacher under moment matching's ancestral sampler (k steps)."""
    stochastic = True

    def __init__(self, teacher, k: int = 3):
        super().__init__()
        self.teacher, self.k = teacher, k
        self.label_dim, self.img_channels, self.img_resolution = teacher.label_dim, 3, teacher.img_resolution
        self.noise_sources = []

    def generate(self, latents, class_labels=None, randn_like=torch.randn_like):
        self.noise_sources.append(randn_like)
        return ancestral_sampler(self.teacher, latents, class_labels, randn_like=randn_like, num_steps=self.k)


def test_seed_inputs_depend_only_on_the_seed():
    z, c = seed_inputs([3, 4, 5], [3, 4, 4], 10, torch.device("cpu"))
    z2, c2 = seed_inputs([5], [3, 4, 4], 10, torch.device("cpu"))
    torch.testing.assert_close(z[2:], z2)
    torch.testing.assert_close(c[2:], c2)
    assert c.shape == (3, 10) and torch.all(c.sum(1) == 1)
    g = torch.Generator().manual_seed(4)  # EDM order: latents first, then the label draw, same generator
    torch.testing.assert_close(z[1], torch.randn([3, 4, 4], generator=g))
    assert int(c[1].argmax()) == int(torch.randint(10, size=[], generator=g))


def test_exact_metrics_for_builtin_teacher(monkeypatch):
    teacher = teacher_for_tests()
    calls = []
    real = pid.exact_eval.reference_endpoints
    monkeypatch.setattr(pid.exact_eval, "reference_endpoints",
                        lambda t, z, c=None, num_steps=512: calls.append(len(z)) or real(t, z, c, num_steps=64))
    evaluate = make_evaluator(teacher, num=6, fid_ref=None, batch=4)
    perfect = evaluate(OracleStudent(teacher))
    assert perfect["primary"] == "rmse" and perfect["mode"] == "min"
    m = perfect["metrics"]
    assert m["rmse"] < 1e-12 and m["component_accuracy"] == 1.0
    assert set(m) >= {"rmse", "component_accuracy", "log_likelihood", "data_log_likelihood"}
    worse = evaluate(OracleStudent(teacher, offset=0.3))["metrics"]
    assert worse["rmse"] == pytest.approx(0.3, rel=1e-9) and worse["log_likelihood"] < m["log_likelihood"]
    # EDM's split of 6 seeds at batch 4: 2 batches of 3; references once (cached) + one oracle pass per call
    assert calls == [3] * 6
    again = make_evaluator(teacher, num=6, fid_ref=None, batch=6)(OracleStudent(teacher, offset=0.3))["metrics"]
    assert again == pytest.approx(worse, rel=1e-12)  # batch size does not change which noise a seed gets


def test_stochastic_generator_gets_distribution_metrics_with_per_seed_noise(monkeypatch):
    teacher = teacher_for_tests()
    monkeypatch.setattr(pid.exact_eval, "reference_endpoints", lambda *a, **k: pytest.fail("not needed"))
    gen = AncestralGenerator(teacher)
    result = make_evaluator(teacher, num=12, fid_ref=None, batch=5)(gen)
    assert result["primary"] == "fd_exact" and result["mode"] == "min"
    m = result["metrics"]
    assert set(m) == {"fd_exact", "component_tv", "rms_to_mean", "data_fd_exact", "data_component_tv",
                      "data_rms_to_mean"}
    assert all(f is not torch.randn_like for f in gen.noise_sources)  # the seeds' own generators
    # the evaluation batch does not change any image: the same numbers at batch 12 and batch 1
    for batch in (12, 1):
        assert make_evaluator(teacher, num=12, fid_ref=None, batch=batch)(gen)["metrics"] == pytest.approx(m,
                                                                                                        rel=1e-12)
    latents, labels = seed_inputs(list(range(12)), [3, 4, 4], 2, torch.device("cpu"))
    shared = ancestral_sampler(teacher, latents, labels, num_steps=3, randn_like=lambda x: torch.zeros_like(x))
    assert pid.exact_eval.distribution_metrics(teacher, shared, labels) != pytest.approx(m, rel=1e-6)


def test_fid_of_stochastic_generator_uses_per_seed_noise(tmp_path):
    det_path = save_torchscript(TinyInception(dim=8, classes=10), str(tmp_path / "inc.pt"))
    g = np.random.RandomState(0).standard_normal((8, 12))
    ref = save_stats(str(tmp_path / "ref.npz"), np.zeros(8), g @ g.T / 12)
    gen = AncestralGenerator(teacher_for_tests(), k=2)
    fids = [make_evaluator(None, num=10, fid_ref=ref, detector=det_path, batch=b, device="cpu")(gen)["metrics"]
            for b in (3, 10)]
    assert fids[0] == pytest.approx(fids[1], rel=1e-9)
    assert all(f is not torch.randn_like for f in gen.noise_sources)


def test_fid_evaluator_matches_fid_of_written_images(tmp_path):
    from pid.images import save_pngs, to_uint8
    det_path = save_torchscript(TinyInception(dim=16, classes=10), str(tmp_path / "inc.pt"))
    student = ToyStudent(scale=0.7, label_dim=3)
    latents, labels = seed_inputs(list(range(24)), [3, 8, 8], 3, torch.device("cpu"))
    save_pngs(to_uint8(student.generate(latents, labels)), list(range(24)), str(tmp_path / "imgs"))
    det = load_detector(det_path, "cpu")
    stats = compute_statistics(det, ImageSet(str(tmp_path / "imgs")), batch=5, progress=False)
    ref = save_stats(str(tmp_path / "ref.npz"), stats["mu"], stats["sigma"])
    student.train()
    result = make_evaluator(None, num=24, fid_ref=ref, detector=det_path, batch=7, device="cpu")(student)
    assert result["primary"] == "fid" and result["mode"] == "min" and student.training  # mode restored
    assert abs(result["metrics"]["fid"]) < 1e-6 * np.trace(stats["sigma"])
    assert 1.0 <= result["metrics"]["is"] <= 10 and "is_std" in result["metrics"]
    assert [n for n, _ in student.calls[1:]] == [6, 6, 6, 6]  # EDM's split: ceil(24/7) near-equal batches
    assert sum((lab for _, lab in student.calls[1:]), []) == labels.argmax(1).tolist()
    evaluate = make_evaluator(None, num=24, fid_ref=ref, detector=det_path, device="cpu")
    other = evaluate(ToyStudent(scale=3.0, label_dim=3))
    assert other["metrics"]["fid"] > 0.01 * np.trace(stats["sigma"])


def test_evaluator_errors(tmp_path):
    with pytest.raises(ConfigError, match="--fid-ref"):
        make_evaluator(torch.nn.Identity(), num=8, fid_ref=None)
    with pytest.raises(CheckpointError):
        make_evaluator(torch.nn.Identity(), num=8, fid_ref=str(tmp_path / "missing.npz"))
    with pytest.raises(ConfigError, match="at least 2"):
        make_evaluator(teacher_for_tests(), num=1, fid_ref=None)


def test_distributed_evaluation_matches_single_process(tmp_path):
    """Under torchrun (2 CPU processes, gloo) seeds are split across ranks; results equal one process's."""
    det_path = save_torchscript(TinyInception(dim=8, classes=10), str(tmp_path / "inc.pt"))
    g = np.random.RandomState(0).standard_normal((8, 12))
    ref = save_stats(str(tmp_path / "ref.npz"), np.zeros(8), g @ g.T / 12)
    out = tmp_path / "dist.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           os.path.join(os.path.dirname(__file__), "metrics_dist_script.py"), str(out), det_path, ref],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    fid = make_evaluator(None, num=23, fid_ref=ref, detector=det_path, batch=4, device="cpu")(
        ToyStudent(scale=0.9, label_dim=3))
    assert got["fid"]["metrics"] == pytest.approx(fid["metrics"], rel=1e-9)
    teacher = teacher_for_tests()
    exact = make_evaluator(teacher, num=7, fid_ref=None, batch=2)(OracleStudent(teacher, offset=0.2))
    for key in ("rmse", "component_accuracy", "log_likelihood"):  # per-image means, weighted by rank counts
        assert got["exact"]["metrics"][key] == pytest.approx(exact["metrics"][key], rel=1e-9)
    stochastic = make_evaluator(teacher, num=7, fid_ref=None, batch=2)(AncestralGenerator(teacher))
    assert got["stochastic"]["metrics"] == pytest.approx(stochastic["metrics"], rel=1e-9)  # gathered from both ranks
    assert got["stochastic"]["primary"] == "fd_exact"
