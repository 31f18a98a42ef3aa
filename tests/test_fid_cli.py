"""fid.py end to end: EDM's golden ref/calc run (fid_golden.pt), Inception Score, torchrun, and user errors."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fid
from metrics_helpers import (IntegerDetector, TinyInception, golden_recipe_folder, random_images,
                             save_torchscript, write_pngs)
from pid.metrics import list_image_files, rank_batches
from pid.metrics.stats import save_stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def golden(edm_vectors):
    return torch.load(os.path.join(edm_vectors, "fid_golden.pt"), weights_only=True)


@pytest.fixture(scope="module")
def golden_dirs(tmp_path_factory, golden):
    root = tmp_path_factory.mktemp("fid_golden")
    golden_recipe_folder(str(root / "ref"), golden["ref"]["n"], golden["ref"]["seed"])
    golden_recipe_folder(str(root / "gen"), golden["gen"]["n"], golden["gen"]["seed"])
    return root, save_torchscript(IntegerDetector(), str(root / "integer_detector.pt"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A few 8x8 image sets and two small detectors for the quick tests."""
    root = tmp_path_factory.mktemp("fid_small")
    write_pngs(str(root / "a"), random_images(24, 1, res=8), (f"{i:06d}.png" for i in range(24)))
    write_pngs(str(root / "b"), random_images(24, 2, res=8, high=64), (f"sub/{i:06d}.png" for i in range(24)))
    save_torchscript(IntegerDetector(res=8, dim=16), str(root / "int16.pt"))
    save_torchscript(TinyInception(dim=32), str(root / "inception.pt"))  # small D keeps sqrtm fast
    return root


def _run(args):
    return CliRunner().invoke(fid.main, args)


def _assert_user_error(result, *fragments):
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_golden_ref_statistics(golden_dirs, golden):
    root, det = golden_dirs
    result = _run(["ref", "--data", str(root / "ref"), "--dest", str(root / "out" / "ref.npz"),
                   "--batch", "64", "--detector", det, "--workers", "0"])
    assert result.exit_code == 0, result.output
    with np.load(root / "out" / "ref.npz") as data:
        assert sorted(data.files) == golden["ref"]["npz_keys"]
        mu, sigma = data["mu"], data["sigma"]
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    want = golden["ref"]
    np.testing.assert_array_equal(mu, want["mu"].numpy())  # integer features: every sum is exact in f64
    np.testing.assert_array_equal(np.diag(sigma), want["sigma_diag"].numpy())
    np.testing.assert_array_equal(sigma[:16, :16], want["sigma_block_0_16"].numpy())
    assert float(np.trace(sigma)) == want["sigma_trace"] and float(sigma.sum()) == want["sigma_sum"]


def test_golden_subset_and_batches(golden_dirs, golden):
    root, _ = golden_dirs
    from pid.metrics import ImageSet
    files = ImageSet(str(root / "gen"), num=golden["gen"]["num"], seed=golden["gen"]["select_seed"]).files
    assert files[:20] == golden["selected_files_first20"]
    assert hashlib.sha256("\n".join(files).encode()).hexdigest() == golden["selected_files_sha256"]
    assert sorted(set(list_image_files(str(root / "gen"))) - set(files)) == golden["excluded_files"]
    sizes = [len(b) for b in rank_batches(golden["gen"]["num"], 64)]
    assert sizes == [call["shape"][0] for call in golden["detector_calls"]]


def test_golden_calc_prints_edm_fid(golden_dirs, golden, monkeypatch):
    root, det = golden_dirs
    ref_npz = root / "out" / "ref.npz"
    if not ref_npz.exists():  # test run alone: make the reference first
        assert _run(["ref", "--data", str(root / "ref"), "--dest", str(ref_npz), "--detector", det,
                     "--workers", "0"]).exit_code == 0
    seen, args = [], []
    real = fid.frechet_distance
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: args.append(a) or seen.append(real(*a)) or seen[-1])
    result = _run(["calc", "--images", str(root / "gen"), "--ref", str(ref_npz), "--num", "2100", "--seed", "7",
                   "--batch", "64", "--detector", det, "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == golden["fid_printed"]
    mu, sigma = args[0][:2]
    want = golden["gen"]
    np.testing.assert_array_equal(mu, want["mu"].numpy())  # the selected subset's statistics are exact
    np.testing.assert_array_equal(np.diag(sigma), want["sigma_diag"].numpy())
    np.testing.assert_array_equal(sigma[:16, :16], want["sigma_block_0_16"].numpy())
    assert float(np.trace(sigma)) == want["sigma_trace"] and float(sigma.sum()) == want["sigma_sum"]
    # FID ~5e9 is a difference of traces ~7e10 through sqrtm of a product with entries ~1e14: BLAS rounding
    # (thread count, CPU) moves it by a few 1e-9 relative; the 6 printed digits are exact.
    assert seen[0] == pytest.approx(golden["fid"], rel=1e-7)


def test_calc_against_own_stats_is_zero_and_is_flag(small):
    ref = small / "a.npz"
    assert _run(["ref", "--data", str(small / "a"), "--dest", str(ref), "--detector", str(small / "int16.pt"),
                 "--workers", "0"]).exit_code == 0
    same = _run(["calc", "--images", str(small / "a"), "--ref", str(ref), "--num", "24",
                 "--detector", str(small / "int16.pt"), "--workers", "0"])
    assert same.exit_code == 0 and abs(float(same.stdout.strip())) < 1e-3 * float(np.load(ref)["sigma"].trace())
    other = _run(["calc", "--images", str(small / "b"), "--ref", str(ref), "--num", "24",
                  "--detector", str(small / "int16.pt"), "--workers", "0"])
    assert other.exit_code == 0 and float(other.stdout.strip()) > 1e3
    inc_ref = small / "inc.npz"
    assert _run(["ref", "--data", str(small / "a"), "--dest", str(inc_ref), "--detector",
                 str(small / "inception.pt"), "--workers", "0"]).exit_code == 0
    both = _run(["calc", "--images", str(small / "b"), "--ref", str(inc_ref), "--num", "20", "--is",
                 "--detector", str(small / "inception.pt"), "--workers", "0"])
    assert both.exit_code == 0, both.output
    lines = both.stdout.strip().splitlines()
    assert len(lines) == 2 and float(lines[0]) > 0 and lines[1].startswith("IS ")
    alone = _run(["is", "--images", str(small / "b"), "--num", "20", "--detector", str(small / "inception.pt"),
                  "--workers", "0"])
    assert alone.exit_code == 0 and alone.stdout.split()[0] == lines[1].split()[1]
    assert 1.0 <= float(alone.stdout.split()[0]) <= 1008


def test_user_errors(small, tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))  # the offline case must not touch ~/.cache
    det = str(small / "int16.pt")
    ref = small / "a16.npz"
    _run(["ref", "--data", str(small / "a"), "--dest", str(ref), "--detector", det, "--workers", "0"])
    calc = ["calc", "--detector", det, "--workers", "0"]
    _assert_user_error(_run(calc + ["--images", str(small / "a"), "--ref", str(ref), "--num", "50"]),
                       "Found 24 images", "--num")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    _assert_user_error(_run(calc + ["--images", str(tmp_path / "empty"), "--ref", str(ref), "--num", "2"]),
                       "Found 0 images")
    (tmp_path / "corrupt.npz").write_bytes(b"not an npz at all")
    _assert_user_error(_run(calc + ["--images", str(small / "a"), "--ref", str(tmp_path / "corrupt.npz")]),
                       "Cannot read reference statistics")
    np.savez(tmp_path / "keyless.npz", mean=np.zeros(16))
    _assert_user_error(_run(calc + ["--images", str(small / "a"), "--ref", str(tmp_path / "keyless.npz")]),
                       "lack key(s) ['mu', 'sigma']")
    save_stats(str(tmp_path / "dim8.npz"), np.zeros(8), np.eye(8))
    _assert_user_error(_run(calc + ["--images", str(small / "a"), "--ref", str(tmp_path / "dim8.npz"),
                                    "--num", "24"]), "16-dimensional features", "8-dimensional")
    _assert_user_error(_run(["calc", "--images", str(small / "a"), "--ref", str(ref), "--num", "24", "--is",
                             "--detector", det]), "Inception Score")
    url = "http://127.0.0.1:9/fid-refs/cifar10-32x32.npz"  # offline: refused at once
    _assert_user_error(_run(calc + ["--images", str(small / "a"), "--ref", url]), url, "place it at")
    (tmp_path / "detector.pkl").write_bytes(b"\x80\x04N.")
    _assert_user_error(_run(["ref", "--data", str(small / "a"), "--dest", str(tmp_path / "x.npz"),
                             "--detector", str(tmp_path / "detector.pkl")]), "not a TorchScript archive")


def test_error_in_a_real_process_has_no_traceback(small, tmp_path):
    """`python fid.py` as users run it: an unreadable image found inside a DataLoader worker is one line."""
    write_pngs(str(tmp_path / "imgs"), random_images(6, 0, res=8), (f"{i}.png" for i in range(6)))
    (tmp_path / "imgs" / "4.png").write_bytes(b"truncated")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "fid.py"), "ref", "--data", str(tmp_path / "imgs"),
                           "--dest", str(tmp_path / "r.npz"), "--detector", str(small / "int16.pt"),
                           "--workers", "2", "--batch", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: Cannot read image '4.png'") and not (tmp_path / "r.npz").exists()


def test_torchrun_two_processes_match_one(small, tmp_path):
    """Under torchrun (gloo, CPU) the per-rank sums add up to the single-process statistics."""
    det = str(small / "int16.pt")
    one = tmp_path / "one.npz"
    assert _run(["ref", "--data", str(small / "b"), "--dest", str(one), "--detector", det, "--batch", "5",
                 "--workers", "0"]).exit_code == 0
    two = tmp_path / "two.npz"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           os.path.join(REPO, "fid.py"), "ref", "--data", str(small / "b"), "--dest", str(two),
                           "--detector", det, "--batch", "5", "--workers", "0", "--device", "cpu"],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = np.load(one), np.load(two)
    np.testing.assert_array_equal(a["mu"], b["mu"])
    np.testing.assert_array_equal(a["sigma"], b["sigma"])


def test_degenerate_fid_is_refused_or_flagged(capsys):
    """Too few images for a full-rank covariance: a negative FID is an error, a positive one a warning."""
    from pid.errors import DataError
    with pytest.raises(DataError, match="negative .*20 images give a singular 2048x2048"):
        fid._check_fid(-31.7, 20, 2048, -1e-3, 0)
    fid._check_fid(12.5, 20, 2048, -1e-3, 0)
    assert "not comparable" in capsys.readouterr().err
    fid._check_fid(-1e-9, 5000, 2048, -1e-3, 0)   # round-off around zero with enough images is fine
    assert capsys.readouterr().err == ""


def test_usage_errors_are_one_line():
    for args in (["calc"], ["nosuch"], ["calc", "--images=x", "--ref=y", "--num=1"]):
        result = _run(args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), result.output


def test_unwritable_dest_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "_stats", lambda *a, **k: pytest.fail("computed statistics before checking --dest"))
    afile = tmp_path / "afile"
    afile.write_text("x")
    for dest in (afile / "ref.npz", afile / "sub" / "ref"):   # .npz is appended to the second
        result = _run(["ref", "--data", str(tmp_path), "--dest", str(dest), "--workers", "0"])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and "--dest" in lines[0], result.output
