"""load_teacher: built-in names, EDM pickles (path and cached URL), frozen modules, clear errors."""

import os

import pytest
import torch

import edm_networks
from edm_networks.pickle_writer import snapshot_bytes
from pid.download import cache_path_for
from pid.errors import CheckpointError, ConfigError, DownloadError
from pid.teachers import EDMTeacher, load_teacher
from pid.toy import GaussianMixtureTeacher

TINY = dict(model_channels=8, channel_mult=[1], num_blocks=1, attn_resolutions=[])


def _write_pickle(path, net):
    with open(path, "wb") as f:
        f.write(snapshot_bytes(net))
    return str(path)


def _assert_frozen(teacher):
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())


def test_builtin_teachers():
    for name, res in (("glyphs16", 16), ("glyphs32", 32)):
        teacher = load_teacher(f"builtin:{name}")
        assert isinstance(teacher, GaussianMixtureTeacher)
        _assert_frozen(teacher)
        assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (res, 3, 10)
        assert (teacher.sigma_min, teacher.sigma_max, teacher.sigma_data) == (0.002, 80.0, 0.5)
        x = torch.zeros(2, 3, res, res)
        assert teacher(x, 1.0, torch.eye(10)[:2]).shape == x.shape
    with pytest.raises(ConfigError, match="builtin:glyphs16"):
        load_teacher("builtin:cifar")


@pytest.mark.parametrize("precond", ["EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond"])
def test_edm_pickle_teacher(tmp_path, precond):
    torch.manual_seed(0)
    net = getattr(edm_networks, precond)(8, 3, label_dim=4, **TINY)
    teacher = load_teacher(_write_pickle(tmp_path / "net.pkl", net))
    assert isinstance(teacher, EDMTeacher) and type(teacher.net).__name__ == precond == teacher.precond_class
    _assert_frozen(teacher)
    assert (teacher.img_resolution, teacher.img_channels, teacher.label_dim) == (8, 3, 4)
    assert teacher.sigma_min == float(net.sigma_min) and teacher.sigma_max == float(net.sigma_max)
    assert teacher.sigma_data == float(getattr(net, "sigma_data", 0.5))
    assert hasattr(teacher.net, "model")  # the student copies the inner network
    x = torch.randn(2, 3, 8, 8)
    labels = torch.eye(4)[[1, 3]]
    sigma = torch.tensor([0.5, 3.0])
    with torch.no_grad():
        assert torch.allclose(teacher(x, sigma, labels), net.eval()(x, sigma, labels), atol=1e-6)
    assert torch.equal(teacher.round_sigma(torch.tensor(1.3)), net.round_sigma(torch.tensor(1.3)))


def test_url_is_downloaded_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/models/edm-tiny.pkl"  # port 9: nothing listens, so any fetch would fail
    with pytest.raises(DownloadError) as err:
        load_teacher(url)
    assert url in str(err.value) and cache_path_for(url) in str(err.value)
    # a file placed by hand at the named cache path is used without any network access
    os.makedirs(os.path.dirname(cache_path_for(url)), exist_ok=True)
    _write_pickle(cache_path_for(url), edm_networks.EDMPrecond(8, 3, **TINY))
    teacher = load_teacher(url)
    assert teacher.precond_class == "EDMPrecond" and teacher.name == url


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_teacher(str(tmp_path / "missing.pkl"))
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises((CheckpointError, edm_networks.NetworkPickleError)):
        load_teacher(str(bad))
    good = _write_pickle(tmp_path / "good.pkl", edm_networks.EDMPrecond(8, 3, **TINY))
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(open(good, "rb").read()[:3000])
    with pytest.raises((CheckpointError, edm_networks.NetworkPickleError)):
        load_teacher(str(truncated))


def test_device_argument():
    teacher = load_teacher("builtin:glyphs16", device="cpu")
    assert teacher.means.device.type == "cpu"
    if torch.cuda.is_available():
        assert load_teacher("builtin:glyphs16", device="cuda").means.device.type == "cuda"
