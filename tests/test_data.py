"""pid.data: EDM dataset zips and image folders, their checks against a teacher, data order, and the sources."""

import io
import json
import math
import os
import types
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from pid.data import (DatasetSource, EpochSampler, ImageDataset, MixtureSource, check_against_teacher,
                      make_data_source, open_dataset)
from pid.errors import ConfigError, DataError
from pid.toy import GaussianMixtureTeacher


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(n: int = 10, res: int = 8, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Random uint8 images [n,res,res,channels]."""
    return np.random.RandomState(seed).randint(0, 256, size=(n, res, res, channels), dtype=np.uint8)


def _edm_names(n: int) -> list:
    """Names as EDM's dataset_tool.py writes them: 1000 images per numbered folder."""
    return [f"{i // 1000:05d}/img{i:08d}.png" for i in range(n)]


def _write_zip(path, names, arrays, labels="absent", compression=zipfile.ZIP_DEFLATED) -> str:
    """Members written in reverse order, so the reader must sort; labels: list, None (null) or 'absent'."""
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for name, array in reversed(list(zip(names, arrays))):
            z.writestr(name, _png(array))
        if labels != "absent":
            z.writestr("dataset.json", json.dumps(
                {"labels": None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}))
    return str(path)


def _write_folder(root, names, arrays, labels="absent") -> str:
    for name, array in zip(names, arrays):
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "wb") as f:
            f.write(_png(array))
    if labels != "absent":
        with open(os.path.join(root, "dataset.json"), "w") as f:
            json.dump({"labels": None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]}, f)
    return str(root)


def _expected(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1]."""
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32)) / 127.5 - 1


def _edm_like(resolution=8, channels=3, label_dim=10):
    """Stands in for an EDM teacher: make_data_source only reads these three attributes."""
    return types.SimpleNamespace(img_resolution=resolution, img_channels=channels, label_dim=label_dim)


def _mixture(label_dim=None, log_weights=None) -> GaussianMixtureTeacher:
    """4 well-separated components of 3x8x8 with classes [0, 1, 1, 2]."""
    means = torch.rand([4, 3, 8, 8], generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    return GaussianMixtureTeacher(means, torch.tensor([0, 1, 1, 2]), std=0.1, log_weights=log_weights,
                                  label_dim=label_dim)


# --- reading ---------------------------------------------------------------------------------------------

def test_zip_pixels_labels_and_sorted_nested_order(tmp_path):
    arrays, names = _pixels(), _edm_names(10)
    names[3] = "00001/deeper/img00000003.png"  # any nesting; order is by full name
    labels = [7, 3, 0, 9, 1, 2, 2, 5, 6, 4]
    ds = open_dataset(_write_zip(tmp_path / "d.zip", names, arrays, labels))
    order = np.argsort(names, kind="stable")
    assert isinstance(ds, ImageDataset) and ds.files == sorted(names) and len(ds) == 10 and ds.shape == (3, 8, 8)
    for i, j in enumerate(order):
        assert torch.equal(ds.image(i), _expected(arrays[j]))
    assert ds.labels.tolist() == [labels[j] for j in order]
    assert ds.image(0).dtype == torch.float32 and ds.resolution == 8 and ds.channels == 3


def test_extreme_pixels_map_to_minus_one_and_one(tmp_path):
    arrays = np.zeros((2, 8, 8, 3), np.uint8)
    arrays[1] = 255
    ds = open_dataset(_write_zip(tmp_path / "d.zip", _edm_names(2), arrays))
    assert ds.image(0).min() == -1 and ds.image(1).max() == 1


def test_folder_recursive_sorted_grayscale_and_label_variants(tmp_path):
    arrays, names = _pixels(6, channels=1), ["b/x.png", "a.png", "b/a/z.png", "c.png", "b/y.png", "a/q.png"]
    root = _write_folder(tmp_path / "f", names, arrays, labels=[0, 1, 2, 3, 4, 5])
    ds = open_dataset(root)
    assert ds.files == sorted(names) and ds.shape == (1, 8, 8)
    for i, name in enumerate(ds.files):
        assert torch.equal(ds.image(i), _expected(arrays[names.index(name)]))
        assert ds.labels[i] == names.index(name)
    assert open_dataset(_write_folder(tmp_path / "nolabels", names, arrays)).labels is None
    assert open_dataset(_write_zip(tmp_path / "null.zip", names, arrays, labels=None)).labels is None


def test_only_the_first_image_is_decoded_at_open(tmp_path):
    path = tmp_path / "d.zip"
    _write_zip(path, _edm_names(4), _pixels(4))
    with zipfile.ZipFile(path, "a") as z:  # sorts last, so open() must not touch it
        z.writestr("00000/img99999999.png", b"not a png")
    ds = open_dataset(str(path))
    assert ds.images(torch.tensor([0, 3])).shape == (2, 3, 8, 8)
    with pytest.raises(DataError, match="img99999999.png") as err:
        ds.image(4)
    assert str(path) in str(err.value)


# --- errors ----------------------------------------------------------------------------------------------

def _assert_one_line_error(exc_info, path) -> None:
    msg = str(exc_info.value)
    assert str(path) in msg and "\n" not in msg, msg


def _bad_paths(tmp_path) -> dict:
    """name -> path of every unusable input."""
    good = _write_zip(tmp_path / "good.zip", _edm_names(3), _pixels(3), compression=zipfile.ZIP_STORED)
    data = open(good, "rb").read()
    paths = {"missing": tmp_path / "missing.zip", "not_zip": tmp_path / "notes.zip", "truncated": tmp_path / "t.zip",
             "empty_zip": tmp_path / "empty.zip", "empty_folder": tmp_path / "emptydir",
             "undecodable": tmp_path / "bad.zip", "damaged_member": tmp_path / "crc.zip"}
    paths["not_zip"].write_text("hello")
    paths["truncated"].write_bytes(data[: len(data) // 2])
    with zipfile.ZipFile(paths["empty_zip"], "w") as z:
        z.writestr("dataset.json", json.dumps({"labels": None}))
    paths["empty_folder"].mkdir()
    with zipfile.ZipFile(paths["undecodable"], "w") as z:
        z.writestr("a.png", b"\x89PNG\r\n\x1a\n but not really")
    # flip bytes inside the stored PNG data of the first image (written last): the central directory stays
    # valid, the CRC does not
    first = data.rindex(b"IDAT")
    paths["damaged_member"].write_bytes(data[:first] + bytes(b ^ 0xFF for b in data[first:first + 16])
                                        + data[first + 16:])
    return paths


@pytest.mark.parametrize("case, words", [
    ("missing", "does not exist"), ("not_zip", "neither a folder nor a zip"), ("truncated", "damaged zip"),
    ("empty_zip", "no images"), ("empty_folder", "no images"), ("undecodable", "not a valid image"),
    ("damaged_member", "damaged inside the zip")])
def test_unusable_inputs_raise_one_line_data_error(tmp_path, case, words):
    path = _bad_paths(tmp_path)[case]
    with pytest.raises(DataError, match=words) as err:
        open_dataset(str(path))
    _assert_one_line_error(err, path)


def test_checks_against_teacher(tmp_path):
    path = _write_zip(tmp_path / "d.zip", _edm_names(4), _pixels(4), labels=[0, 1, 2, 9])
    ds = open_dataset(path)
    check_against_teacher(ds, 8, 3, 10)
    check_against_teacher(ds, 8, 3, 0)  # unconditional: labels ignored
    for args, words in [((16, 3, 10), "8x8"), ((8, 1, 10), "3-channel"), ((8, 3, 9), "[0, 8]")]:
        with pytest.raises(DataError, match=words.replace("[", r"\[").replace("]", r"\]")) as err:
            check_against_teacher(ds, *args)
        _assert_one_line_error(err, path)
    unlabelled = open_dataset(_write_zip(tmp_path / "u.zip", _edm_names(4), _pixels(4)))
    with pytest.raises(DataError, match="no labels") as err:
        check_against_teacher(unlabelled, 8, 3, 10)
    _assert_one_line_error(err, tmp_path / "u.zip")
    negative = open_dataset(_write_zip(tmp_path / "n.zip", _edm_names(2), _pixels(2), labels=[-1, 0]))
    with pytest.raises(DataError, match="-1"):
        check_against_teacher(negative, 8, 3, 10)


def test_bad_labels_files(tmp_path):
    names, arrays = _edm_names(3), _pixels(3)
    root = _write_folder(tmp_path / "f", names, arrays, labels=[0, 1, 2])
    table = json.load(open(os.path.join(root, "dataset.json")))
    for content, words in [(json.dumps({"labels": table["labels"][:2]}), "no label for"),
                           (json.dumps({"labels": [[n, [0.5, 0.5]] for n in names]}), "integer class"),
                           ("{not json", "Cannot read")]:
        with open(os.path.join(root, "dataset.json"), "w") as f:
            f.write(content)
        with pytest.raises(DataError, match=words) as err:
            open_dataset(root)
        _assert_one_line_error(err, root)


# --- order -----------------------------------------------------------------------------------------------

def test_epoch_sampler_permutations_split_invariance_and_seeds():
    n = 7
    s = EpochSampler(n, seed=3)
    for epoch in range(3):
        assert sorted(s.indices(epoch * n, n).tolist()) == list(range(n))
    first = s.indices(0, 6 * n)
    assert first.dtype == torch.int64 and first.shape == (6 * n,)
    for start, a, b in [(0, 3, 4), (5, 4, 9), (13, 1, 0), (20, 8, 8)]:  # spans epoch boundaries
        assert torch.equal(s.indices(start, a + b), torch.cat([s.indices(start, a), s.indices(start + a, b)]))
        assert torch.equal(s.indices(start, a + b), first[start:start + a + b])
    assert torch.equal(EpochSampler(n, 3).indices(0, 6 * n), first)  # deterministic, no hidden state
    assert not torch.equal(EpochSampler(n, 4).indices(0, 6 * n), first)
    assert not torch.equal(s.indices(0, n), s.indices(n, n))  # each epoch has its own order
    assert s.indices(4, 0).numel() == 0


def test_epoch_sampler_uses_the_documented_hash():
    import hashlib
    seed = int.from_bytes(hashlib.sha256(b"pid-data/11/2").digest()[:8], "little") & ((1 << 63) - 1)
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(EpochSampler(50, 11).indices(100, 50), expected)


# --- sources ---------------------------------------------------------------------------------------------

def test_dataset_source_batches_labels_and_process_split(tmp_path):
    arrays, labels = _pixels(10), [7, 3, 0, 9, 1, 2, 2, 5, 6, 4]
    ds = open_dataset(_write_zip(tmp_path / "d.zip", _edm_names(10), arrays, labels))
    src = DatasetSource(ds, label_dim=10, seed=1)
    x, y = src.sample(8, 6, torch.Generator(), "cpu")  # crosses the first epoch boundary
    idx = EpochSampler(10, 1).indices(8, 6)
    assert x.dtype == y.dtype == torch.float32 and x.shape == (6, 3, 8, 8) and y.shape == (6, 10)
    assert torch.equal(x, torch.stack([_expected(arrays[i]) for i in idx]))
    assert y.argmax(1).tolist() == [labels[i] for i in idx] and torch.equal(y.sum(1), torch.ones(6))
    # two processes with micro-batch 3 see exactly the one-process batch
    parts = [src.sample(8 + slot * 3, 3, None, "cpu") for slot in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert DatasetSource(ds, label_dim=0, seed=1).sample(0, 2, None, "cpu")[1] is None
    unlabelled = open_dataset(_write_zip(tmp_path / "u.zip", _edm_names(3), _pixels(3)))
    with pytest.raises(DataError, match="no labels"):
        DatasetSource(unlabelled, label_dim=10, seed=0)


def test_mixture_source_is_reproducible_and_labels_follow_components():
    teacher = _mixture(label_dim=5)
    src = MixtureSource(teacher)
    x, y = src.sample(0, 64, torch.Generator().manual_seed(5), "cpu")
    x2, y2 = src.sample(999, 64, torch.Generator().manual_seed(5), "cpu")  # positions are ignored
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.dtype == y.dtype == torch.float32 and x.shape == (64, 3, 8, 8) and y.shape == (64, 5)
    assert not torch.equal(x, src.sample(0, 64, torch.Generator().manual_seed(6), "cpu")[0])
    components = teacher.component_of(x.double())  # std 0.1 vs means ~1 apart per pixel: unambiguous
    assert y.argmax(1).tolist() == teacher.component_labels[components].tolist()
    unconditional = GaussianMixtureTeacher(teacher.means, teacher.component_labels, std=0.1, label_dim=0)
    assert MixtureSource(unconditional).sample(0, 4, torch.Generator(), "cpu")[1] is None


def test_mixture_source_moments_and_weights():
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    teacher = _mixture(log_weights=weights.log())
    n = 20000
    x, _ = MixtureSource(teacher).sample(0, n, torch.Generator().manual_seed(0), "cpu")
    x, s2 = x.double().reshape(n, -1), teacher.std ** 2
    mu = teacher.means.reshape(4, -1)
    mean = (weights[:, None] * mu).sum(0)  # per pixel
    d = mu - mean
    var = s2 + (weights[:, None] * d ** 2).sum(0)
    m4 = (weights[:, None] * (d ** 4 + 6 * d ** 2 * s2 + 3 * s2 ** 2)).sum(0)
    # 5 standard errors per pixel: over 192 pixels a false failure has probability ~1e-4
    assert ((x.mean(0) - mean).abs() <= 5 * (var / n).sqrt()).all()
    assert ((x.var(0) - var).abs() <= 5 * ((m4 - var ** 2) / n).sqrt()).all()
    counts = torch.bincount(teacher.component_of(x.reshape(n, 3, 8, 8)), minlength=4).double()
    assert ((counts / n - weights).abs() <= 5 * (weights * (1 - weights) / n).sqrt()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA generator")
def test_mixture_source_with_a_cuda_generator():
    src = MixtureSource(_mixture())
    x, y = src.sample(0, 8, torch.Generator("cuda").manual_seed(1), "cuda")
    assert x.device.type == y.device.type == "cuda" and x.dtype == torch.float32
    assert torch.equal(x, src.sample(0, 8, torch.Generator("cuda").manual_seed(1), "cuda")[0])


def test_make_data_source(tmp_path):
    mixture = _mixture(label_dim=10)
    assert isinstance(make_data_source(None, mixture, seed=0), MixtureSource)
    with pytest.raises(ConfigError, match="--data=dataset.zip"):
        make_data_source(None, _edm_like(), seed=0)
    path = _write_zip(tmp_path / "d.zip", _edm_names(4), _pixels(4), labels=[0, 1, 2, 3])
    for teacher in (_edm_like(), mixture):  # files work for the built-in teacher too, checked the same way
        src = make_data_source(path, teacher, seed=0)
        assert isinstance(src, DatasetSource) and src.sample(0, 2, None, "cpu")[1].shape == (2, 10)
    with pytest.raises(DataError, match="16x16"):
        make_data_source(path, _edm_like(resolution=16), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        make_data_source(str(tmp_path / "nope"), _edm_like(), seed=0)
    assert math.isfinite(float(make_data_source(path, _edm_like(label_dim=0), 0).sample(0, 3, None, "cpu")[0].sum()))
