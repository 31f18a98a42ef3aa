"""sample.py end to end: EDM-identical PNGs on the golden networks, built-in teachers, students, torchrun, errors."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import edm_networks
from edm_networks.pickle_writer import snapshot_bytes
from pid.images import to_uint8
from pid.samplers import ancestral_sampler, edm_sampler
from pid.seeds import StackedRandomGenerator
from pid.teachers import load_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(REPO, "sample.py"))
sample_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sample_cli)


def run(*args):
    return CliRunner().invoke(sample_cli.main, [str(a) for a in args] + ["--device=cpu"])


def png(path):
    return np.array(Image.open(path))


def _golden_pickle(folder, name, tmp_path):
    data = torch.load(os.path.join(folder, f"{name}.pt"), weights_only=True)
    kwargs = data["init_kwargs"]
    net = getattr(edm_networks, kwargs["precond_class"])(**kwargs["edm_constructor_kwargs"])
    net.load_state_dict(data["state_dict"])
    path = tmp_path / f"{name}.pkl"
    path.write_bytes(snapshot_bytes(net))
    return str(path), data


GOLDEN = ["songunet_ddpmpp_cond_edm", "songunet_ddpmpp_uncond_edm", "songunet_ddpmpp_cond_vp",
          "songunet_ddpmpp_uncond_ve", "songunet_ncsnpp_cond_edm", "songunet_ncsnpp_uncond_edm",
          "songunet_ncsnpp_cond_ve", "songunet_ncsnpp_uncond_vp", "songunet_skipskip_uncond_edm",
          "dhariwalunet_cond_iddpm", "dhariwalunet_cond_edm"]


def test_golden_networks_give_edm_pngs(edm_vectors, tmp_path):
    """EDM pickle -> sample.py -> PNG equals EDM's uint8 images (seeds 0,1, 8 steps), on every golden network."""
    worst = 0
    for name in GOLDEN:
        path, data = _golden_pickle(edm_vectors, name, tmp_path)
        out = tmp_path / name
        result = run("--ckpt", path, "--seeds=0,1", "--steps=8", "--outdir", out)
        assert result.exit_code == 0, result.output
        for i, seed in enumerate(data["sampler_seeds"]):
            diff = np.abs(png(out / f"{seed:06d}.png").astype(int) - data["sampler_images_uint8"][i].numpy())
            worst = max(worst, int(diff.max()))
    assert worst <= 1  # measured: 0 (EDM itself allows rare off-by-one across thread counts)


@pytest.mark.parametrize("name", ["songunet_ddpmpp_cond_vp", "dhariwalunet_cond_iddpm"])
def test_golden_stochastic_and_ablation_pngs(edm_vectors, tmp_path, name):
    """--S_churn/... and --solver/--disc/... reach the right sampler with the per-seed noise."""
    path, data = _golden_pickle(edm_vectors, name, tmp_path)
    stoch = data["sampler_stoch_kwargs"]
    abl = data["ablation_kwargs"]
    cases = [("stoch", ["--S_churn", stoch["S_churn"], "--S_min", stoch["S_min"], "--S_max", stoch["S_max"],
                        "--S_noise", stoch["S_noise"]], data["sampler_stoch_out"]),
             ("abl", ["--solver", abl["solver"], "--disc", abl["discretization"], "--schedule", abl["schedule"],
                      "--scaling", abl["scaling"]], data["ablation_out"])]
    for tag, extra, ref in cases:
        result = run("--ckpt", path, "--seeds=0-1", "--steps=8", "--outdir", tmp_path / tag, *extra)
        assert result.exit_code == 0, result.output
        expected = to_uint8(ref).numpy()
        for i in range(2):
            diff = np.abs(png(tmp_path / tag / f"{i:06d}.png").astype(int) - expected[i])
            assert int(diff.max()) <= 1


def test_sdpa_attention_option_gives_edm_pngs(edm_vectors, tmp_path):
    """--attention=sdpa on a golden network with attention: EDM's own uint8 images (off by one at most)."""
    path, data = _golden_pickle(edm_vectors, "dhariwalunet_cond_edm", tmp_path)
    result = run("--ckpt", path, "--seeds=0,1", "--steps=8", "--outdir", tmp_path / "sdpa", "--attention=sdpa")
    assert result.exit_code == 0, result.output
    for i, seed in enumerate(data["sampler_seeds"]):
        diff = np.abs(png(tmp_path / "sdpa" / f"{seed:06d}.png").astype(int) - data["sampler_images_uint8"][i].numpy())
        assert int(diff.max()) <= 1


def test_builtin_teacher_outputs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run("--ckpt=builtin:glyphs16", "--seeds=0-4", "--batch=2", "--outdir", a, "--grid", tmp_path / "g.png",
               "--npz", tmp_path / "s.npz").exit_code == 0
    assert run("--ckpt=builtin:glyphs16", "--seeds=3,4,0-2", "--batch=5", "--outdir", b,
               "--subdirs").exit_code == 0
    for seed in range(5):  # a seed's image does not depend on its batch
        assert np.array_equal(png(a / f"{seed:06d}.png"), png(b / "000000" / f"{seed:06d}.png"))
    assert png(tmp_path / "g.png").shape == (2 * 16, 3 * 16, 3)
    npz = np.load(tmp_path / "s.npz")
    assert npz["images"].shape == (5, 16, 16, 3) and npz["images"].dtype == np.uint8
    assert npz["seeds"].tolist() == [0, 1, 2, 3, 4] and npz["labels"].shape == (5,)
    assert np.array_equal(npz["images"][3], png(a / "000003.png"))
    # the same images as calling the sampler directly with EDM's draw order
    teacher = load_teacher("builtin:glyphs16")
    rnd = StackedRandomGenerator("cpu", [0, 1])
    latents = rnd.randn([2, 3, 16, 16])
    labels = torch.eye(10)[rnd.randint(10, size=[2])]
    assert labels.argmax(1).tolist() == npz["labels"][:2].tolist()
    direct = to_uint8(edm_sampler(teacher, latents, labels, randn_like=rnd.randn_like)).numpy()
    assert np.array_equal(direct, npz["images"][:2])


def test_class_option(tmp_path):
    assert run("--ckpt=builtin:glyphs16", "--seeds=0-7", "--class=4", "--npz", tmp_path / "c.npz").exit_code == 0
    npz = np.load(tmp_path / "c.npz")
    teacher = load_teacher("builtin:glyphs16")
    images = torch.from_numpy(npz["images"]).permute(0, 3, 1, 2).double() / 127.5 - 1
    assert npz["labels"].tolist() == [4] * 8
    assert teacher.component_labels[teacher.component_of(images)].tolist() == [4] * 8


def test_student_checkpoint_one_call_per_batch(tmp_path, monkeypatch):
    student_mod = pytest.importorskip("pid.methods.pid.student")  # the student lands with issue 4
    from pid.training.checkpoint import write_student_checkpoint
    student = student_mod.student_from_teacher(load_teacher("builtin:glyphs16"), "builtin:glyphs16")
    path = tmp_path / "student-000000.pt"
    write_student_checkpoint(str(path), student.export_spec(), {"raw": student.state_dict()}, "raw", step=0)
    calls = []
    original = student_mod.PIDStudent.generate
    monkeypatch.setattr(student_mod.PIDStudent, "generate",
                        lambda self, *a, **k: (calls.append(1), original(self, *a, **k))[1])
    result = run("--ckpt", path, "--seeds=0-5", "--batch=3", "--npz", tmp_path / "s.npz")
    assert result.exit_code == 0, result.output
    assert len(calls) == 2  # one network call per batch of 3
    rnd = StackedRandomGenerator("cpu", [0, 1, 2])
    latents = rnd.randn([3, 3, 16, 16])
    labels = torch.eye(10)[rnd.randint(10, size=[3])]
    with torch.no_grad():
        expected = to_uint8(original(student.eval(), latents, labels)).numpy()
    assert np.array_equal(np.load(tmp_path / "s.npz")["images"][:3], expected)


def _assert_user_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [l for l in result.output.strip().splitlines() if l.startswith("Error")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


def test_bad_input_gives_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    out = ["--outdir", tmp_path / "o"]
    _assert_user_error(run("--ckpt=builtin:glyphs16", "--seeds=0-x", *out), "0-x")
    _assert_user_error(run("--ckpt=builtin:glyphs16", "--seeds=5-2", *out), "5-2")
    _assert_user_error(run("--ckpt=builtin:glyphs16", "--class=10", *out), "--class=10", "0..9")
    _assert_user_error(run("--ckpt=builtin:nope", *out), "builtin:nope")
    _assert_user_error(run("--ckpt", tmp_path / "missing.pkl", *out), "missing.pkl")
    _assert_user_error(run("--ckpt=builtin:glyphs16"), "--outdir")
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(b"\x80\x04garbage" + os.urandom(100))
    _assert_user_error(run("--ckpt", corrupt, *out), "corrupt.pkl")
    url = "http://127.0.0.1:9/edm.pkl"
    _assert_user_error(run("--ckpt", url, *out), url, str(tmp_path / "cache"))
    uncond = tmp_path / "uncond.pkl"
    uncond.write_bytes(snapshot_bytes(edm_networks.EDMPrecond(8, 3, model_channels=8, channel_mult=[1],
                                                              num_blocks=1, attn_resolutions=[])))
    _assert_user_error(run("--ckpt", uncond, "--class=0", *out), "unconditional")
    _assert_user_error(run("--ckpt=builtin:glyphs16", "--batch=0", *out), "--batch", "x>=1")  # click's range check
    _assert_user_error(run("--ckpt=builtin:glyphs16", "--class=-1", *out), "--class")
    _assert_user_error(run("--ckpt=builtin:glyphs16", "--seeds=0-99999999999", *out), "0-99999999999", "split")


def test_outputs_are_checked_before_sampling(tmp_path, monkeypatch):
    """A --grid/--npz/--outdir that cannot be written fails at once, before a single image is sampled."""
    import sample
    monkeypatch.setattr(sample, "generate_batch", lambda *a, **k: pytest.fail("sampled before checking outputs"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "adir").mkdir()
    ckpt = "--ckpt=builtin:glyphs16"
    _assert_user_error(run(ckpt, "--outdir", afile), str(afile), "not a directory")
    _assert_user_error(run(ckpt, "--outdir", afile / "sub"), str(afile / "sub"), "writable")
    _assert_user_error(run(ckpt, "--grid", tmp_path / "adir"), "is a directory")
    _assert_user_error(run(ckpt, "--grid", tmp_path / "grid"), "must end in .png")
    _assert_user_error(run(ckpt, "--grid", afile / "g.png"), "afile")
    _assert_user_error(run(ckpt, "--npz", tmp_path / "x.txt"), "must end in .npz")
    _assert_user_error(run(ckpt, "--npz", afile / "x.npz"), "afile")


def test_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", str(tmp_path / "x.pkl"),
                           "--outdir", str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "x.pkl" in proc.stderr


def test_torchrun_splits_seeds_across_ranks(tmp_path):
    """Two CPU processes (gloo) write every seed once, identical to one process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "sample.py"), "--ckpt=builtin:glyphs16", "--seeds=0-6", "--batch=2", "--device=cpu",
           "--outdir", str(tmp_path / "dist"), "--npz", str(tmp_path / "dist.npz")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert run("--ckpt=builtin:glyphs16", "--seeds=0-6", "--npz", tmp_path / "one.npz").exit_code == 0
    dist, one = np.load(tmp_path / "dist.npz"), np.load(tmp_path / "one.npz")
    assert dist["seeds"].tolist() == list(range(7))
    assert np.array_equal(dist["images"], one["images"]) and np.array_equal(dist["labels"], one["labels"])
    assert sorted(os.listdir(tmp_path / "dist")) == [f"{s:06d}.png" for s in range(7)]


def test_ancestral_sampler_option_is_per_seed(tmp_path):
    one, five = tmp_path / "one", tmp_path / "five"
    assert run("--ckpt=builtin:glyphs16", "--sampler=ancestral", "--steps=3", "--seeds=0-4", "--batch=1",
               "--outdir", one).exit_code == 0
    result = run("--ckpt=builtin:glyphs16", "--sampler=ancestral", "--steps=3", "--seeds=0-4", "--batch=5",
                 "--outdir", five, "--npz", tmp_path / "a.npz")
    assert result.exit_code == 0, result.output
    for seed in range(5):
        assert np.array_equal(png(one / f"{seed:06d}.png"), png(five / f"{seed:06d}.png"))
    teacher = load_teacher("builtin:glyphs16")
    rnd = StackedRandomGenerator("cpu", [0, 1, 2, 3, 4])
    latents = rnd.randn([5, 3, 16, 16])
    labels = torch.eye(10)[rnd.randint(10, size=[5])]
    direct = to_uint8(ancestral_sampler(teacher, latents, labels, randn_like=rnd.randn_like, num_steps=3)).numpy()
    assert np.array_equal(direct, np.load(tmp_path / "a.npz")["images"])
    heun = run("--ckpt=builtin:glyphs16", "--seeds=0-4", "--npz", tmp_path / "h.npz")
    assert heun.exit_code == 0 and not np.array_equal(np.load(tmp_path / "h.npz")["images"], direct)
    _assert_user_error(run("--ckpt=builtin:glyphs16", "--sampler=ancestral", "--S_churn=1", "--outdir", one),
                       "--S_churn")


class FakeMMStudent(torch.nn.Module):
    """Stands in for pid.methods.mm's student: the glyph teacher under the ancestral sampler with k = 2."""
    stochastic = True

    def __init__(self):
        super().__init__()
        self.teacher, self.k = load_teacher("builtin:glyphs16"), 2
        self.img_channels, self.img_resolution, self.label_dim = 3, 16, 10
        self.steps_asked = []

    def generate(self, latents, class_labels=None, randn_like=torch.randn_like, num_steps=None):
        self.steps_asked.append(num_steps)
        return ancestral_sampler(self.teacher, latents, class_labels, randn_like=randn_like,
                                 num_steps=num_steps or self.k)


def test_mm_student_checkpoint_hook(tmp_path, monkeypatch):
    from pid.training.checkpoint import write_student_checkpoint
    path = tmp_path / "student-000000.pt"
    write_student_checkpoint(str(path), {"class": "MMStudent"}, {"raw": {}}, "raw", step=0)
    monkeypatch.setitem(sys.modules, "pid.methods.mm.student", None)  # an install without moment matching
    _assert_user_error(run("--ckpt", path, "--outdir", tmp_path / "x"), "MMStudent", "pid.methods.mm")
    students = []
    fake = type(sys)("pid.methods.mm.student")
    fake.load_mm_student = lambda spec, device=None: students.append(FakeMMStudent()) or students[-1]
    monkeypatch.setitem(sys.modules, "pid.methods.mm.student", fake)
    assert run("--ckpt", path, "--seeds=0-3", "--batch=4", "--npz", tmp_path / "own.npz").exit_code == 0
    assert run("--ckpt", path, "--seeds=0-3", "--batch=1", "--steps=2", "--npz", tmp_path / "two.npz").exit_code == 0
    assert students[0].steps_asked == [None] and students[1].steps_asked == [2] * 4  # --steps only when given
    # per-seed noise: batch 4 with its own k equals batch 1 with k given explicitly
    assert np.array_equal(np.load(tmp_path / "own.npz")["images"], np.load(tmp_path / "two.npz")["images"])
