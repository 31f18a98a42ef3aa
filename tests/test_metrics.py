"""pid.metrics: Fréchet distance (EDM's synthetic cases), statistics, Inception Score, detector loading, image sets."""

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from metrics_helpers import IntegerDetector, TinyInception, random_images, save_torchscript, write_pngs
from pid.download import cache_path_for
from pid.errors import CheckpointError, ConfigError, DataError, DownloadError
from pid.metrics import (ImageSet, StatsAccumulator, compute_statistics, frechet_distance, inception_score,
                         inception_score_from_logits, list_image_files, load_detector, load_stats, save_stats,
                         select_subset)


@pytest.fixture(scope="module")
def synthetic(edm_vectors):
    return torch.load(os.path.join(edm_vectors, "fid_golden.pt"), weights_only=True)["synthetic"]


def _recipe(d: int):
    """The recipe recorded in fid_golden.pt['synthetic'][str(d)]['recipe']."""
    rs = np.random.RandomState(d)
    a, b = rs.standard_normal((d, d + 16)), rs.standard_normal((d, d + 16))
    s1, s2 = a @ a.T / (d + 16), b @ b.T / (d + 16)
    m1 = rs.standard_normal(d)
    m2 = rs.standard_normal(d) * 0.5
    return m1, s1, m2, s2


def test_frechet_synthetic_64(synthetic):
    case = synthetic["64"]
    m1, s1, m2, s2 = _recipe(64)
    np.testing.assert_array_equal(m1, case["mu1"].numpy())  # the recipe is the stored data
    np.testing.assert_array_equal(s2, case["sigma2"].numpy())
    got = frechet_distance(case["mu1"].numpy(), case["sigma1"].numpy(), case["mu2"].numpy(), case["sigma2"].numpy())
    assert got == pytest.approx(case["fid"], rel=1e-10)


def test_frechet_synthetic_2048(synthetic):
    assert frechet_distance(*_recipe(2048)) == pytest.approx(synthetic["2048"]["fid"], rel=1e-10)


def test_frechet_closed_form_and_shape_check():
    # commuting (diagonal) covariances: FID = |dm|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    m1, m2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(want, rel=1e-12)
    with pytest.raises(DataError, match="same detector"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_accumulator_matches_numpy_and_ignores_batching():
    feats = torch.from_numpy(np.random.RandomState(0).standard_normal((37, 5)) * 3 + 1)
    whole, parts = StatsAccumulator(), StatsAccumulator()
    whole.update(feats)
    for chunk in feats.split(6):
        parts.update(chunk.to(torch.float32).to(torch.float64))  # exact round-trip of the same values
    mu, sigma = whole.mu_sigma()
    np.testing.assert_allclose(mu, feats.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.numpy(), rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(parts.mu_sigma()[1], np.cov(feats.numpy().astype(np.float32), rowvar=False),
                               rtol=1e-9, atol=1e-9)
    with pytest.raises(DataError):
        StatsAccumulator().mu_sigma()


def test_fid_of_a_set_with_itself_is_zero_and_different_sets_positive(tmp_path):
    det_path = save_torchscript(IntegerDetector(res=8, dim=12, seed=3), str(tmp_path / "det.pt"))
    det = load_detector(det_path, "cpu")
    write_pngs(str(tmp_path / "x"), random_images(40, 5, res=8), (f"{i}.png" for i in range(40)))
    write_pngs(str(tmp_path / "y"), random_images(40, 6, res=8, low=100, high=160), (f"{i}.png" for i in range(40)))
    sx = compute_statistics(det, ImageSet(str(tmp_path / "x")), batch=7, progress=False)
    sy = compute_statistics(det, ImageSet(str(tmp_path / "y")), batch=64, progress=False)
    scale = np.trace(sx["sigma"])
    assert abs(frechet_distance(sx["mu"], sx["sigma"], sx["mu"], sx["sigma"])) < 1e-6 * scale
    assert frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"]) > 0.5 * scale


def _peaked_logits(n: int, k: int, a: float) -> torch.Tensor:
    """Logits whose softmax is `a` on class i % k and (1-a)/(k-1) elsewhere."""
    logits = torch.full([n, k], float(np.log((1 - a) / (k - 1))), dtype=torch.float64)
    logits[torch.arange(n), torch.arange(n) % k] = float(np.log(a))
    return logits


def test_inception_score_closed_form():
    k, a = 10, 0.7
    # every split holds each class equally often, so p(y) is uniform and KL is the same for every image
    kl = a * np.log(a * k) + (1 - a) * np.log((1 - a) / (k - 1) * k)
    mean, std = inception_score_from_logits(_peaked_logits(200, k, a), splits=10)
    assert mean == pytest.approx(np.exp(kl), rel=1e-12) and std == pytest.approx(0, abs=1e-12)
    one_hot = np.eye(k)[np.arange(100) % k]
    assert inception_score(one_hot, splits=10)[0] == pytest.approx(k, rel=1e-12)  # 0·log 0 handled
    assert inception_score(np.full([50, 7], 1 / 7), splits=5)[0] == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(DataError, match="splits"):
        inception_score(one_hot[:5], splits=10)


def test_inception_score_splits_are_contiguous_chunks():
    k = 4
    probs = np.concatenate([np.eye(k)[np.arange(20) % k], np.full([20, k], 1 / k)])  # split 0 sharp, split 1 flat
    mean, std = inception_score(probs, splits=2)
    assert mean == pytest.approx((k + 1) / 2) and std == pytest.approx((k - 1) / 2)


def test_inception_loader_on_torchscript_file(tmp_path):
    path = save_torchscript(TinyInception(seed=1), str(tmp_path / "inception-2015-12-05.pt"))
    det = load_detector(path, "cpu")
    assert det.has_probs
    rgb = torch.from_numpy(random_images(3, 0, res=12)).permute(0, 3, 1, 2).contiguous()
    feats = det.features(rgb)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float64
    probs = det.probs(rgb)
    assert probs.shape == (3, 1008)
    torch.testing.assert_close(probs.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-5)
    gray = rgb[:, :1]
    torch.testing.assert_close(det.features(gray), det.features(gray.repeat(1, 3, 1, 1)))  # EDM repeats channels
    with pytest.raises(DataError, match="uint8"):
        det.features(rgb.float())


def test_detector_download_cache_and_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/metrics/inception-2015-12-05.pt"  # port 9 (discard): refused at once
    with pytest.raises(DownloadError) as info:
        load_detector(url, "cpu")
    assert url in str(info.value) and cache_path_for(url) in str(info.value)
    os.makedirs(os.path.dirname(cache_path_for(url)), exist_ok=True)
    save_torchscript(TinyInception(dim=16), cache_path_for(url))  # placed by hand, as the message says
    assert load_detector(url, "cpu").features(torch.zeros([2, 3, 8, 8], dtype=torch.uint8)).shape == (2, 16)


def test_detector_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_detector(str(tmp_path / "nope.pt"), "cpu")
    (tmp_path / "inception-2015-12-05.pkl").write_bytes(b"\x80\x04\x95" + b"\x00" * 20)
    with pytest.raises(CheckpointError, match="arbitrary code"):
        load_detector(str(tmp_path / "inception-2015-12-05.pkl"), "cpu")
    with zipfile.ZipFile(tmp_path / "broken.pt", "w") as z:
        z.writestr("archive/data.pkl", b"garbage")
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_detector(str(tmp_path / "broken.pt"), "cpu")
    plain = load_detector(save_torchscript(IntegerDetector(res=4, dim=3), str(tmp_path / "d.pt")), "cpu")
    with pytest.raises(ConfigError, match="Inception Score"):
        plain.probs(torch.zeros([1, 3, 4, 4], dtype=torch.uint8))


def test_image_sets_folder_zip_subset_and_modes(tmp_path):
    arrays = random_images(6, 9, res=8)
    names = [f"{i // 3:05d}/img{i:08d}.png" for i in range(6)]  # EDM dataset_tool layout
    write_pngs(str(tmp_path / "folder"), arrays, names)
    (tmp_path / "folder" / "dataset.json").write_text(json.dumps({"labels": None}))
    with zipfile.ZipFile(tmp_path / "data.zip", "w", compression=zipfile.ZIP_STORED) as z:
        for array, name in zip(arrays, names):
            buf = io.BytesIO()
            from PIL import Image
            Image.fromarray(array).save(buf, format="png", compress_level=0)
            z.writestr(name, buf.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": None}))
    assert list_image_files(str(tmp_path / "folder")) == names == list_image_files(str(tmp_path / "data.zip"))
    folder, archive = ImageSet(str(tmp_path / "folder")), ImageSet(str(tmp_path / "data.zip"))
    for i in range(6):
        assert folder[i].dtype == torch.uint8 and folder[i].shape == (3, 8, 8)
        torch.testing.assert_close(folder[i], archive[i])
        torch.testing.assert_close(folder[i], torch.from_numpy(arrays[i]).permute(2, 0, 1))
    loader = torch.utils.data.DataLoader(archive, batch_size=2, num_workers=2)  # workers reopen the zip
    torch.testing.assert_close(torch.cat(list(loader)), torch.stack([folder[i] for i in range(6)]))
    sub = ImageSet(str(tmp_path / "data.zip"), num=4, seed=3)
    assert sub.files == [names[i] for i in select_subset(6, 4, 3)] and len(sub) == 4
    idx = np.arange(6)
    np.random.RandomState(3).shuffle(idx)
    assert list(select_subset(6, 4, 3)) == sorted(idx[:4])
    assert list(select_subset(6, 6, 3)) == list(range(6))
    write_pngs(str(tmp_path / "gray"), random_images(2, 1, res=8)[..., 0], ["a.png", "b.png"])
    assert ImageSet(str(tmp_path / "gray"))[0].shape == (1, 8, 8)


def test_image_set_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageSet(str(tmp_path / "missing"))
    write_pngs(str(tmp_path / "mixed"), [random_images(1, 0, res=8)[0], random_images(1, 0, res=4)[0]],
               ["a.png", "b.png"])
    with pytest.raises(DataError, match="same size"):
        ImageSet(str(tmp_path / "mixed"))[1]
    with pytest.raises(DataError, match="at least 2"):
        ImageSet(str(tmp_path / "mixed"), num=1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png")
    (tmp_path / "bad" / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="Cannot read image"):
        ImageSet(str(tmp_path / "bad"))


def test_stats_files_roundtrip_and_errors(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    path = save_stats(str(tmp_path / "deep" / "ref"), mu, sigma)
    assert path.endswith("ref.npz")
    got_mu, got_sigma = load_stats(path)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    with pytest.raises(CheckpointError, match="not found"):
        load_stats(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "shape.npz", mu=np.zeros(3), sigma=np.zeros((3, 2)))
    with pytest.raises(CheckpointError, match="inconsistent shapes"):
        load_stats(str(tmp_path / "shape.npz"))
    np.savez(tmp_path / "obj.npz", mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1))
    with pytest.raises(CheckpointError, match="Cannot read"):
        load_stats(str(tmp_path / "obj.npz"))  # object arrays would need pickle: refused
