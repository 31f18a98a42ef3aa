"""Tests of edm_networks.load_network_pickle: EDM-format pickles written by tests/edm_pickle_writer.py load
into working networks; hostile pickles are refused and provably run nothing; bad files give clear errors."""

import collections
import io
import json
import os
import pathlib
import pickle

import numpy as np
import pytest
import torch

import edm_networks
from edm_networks import InertRecord, NetworkPickleError, UnsafePickleError, load_network_pickle
from edm_networks.presets import build_preset
from edm_pickle_writer import (GlobalRef, Reduced, dumps, module_record, persistent, scan, snapshot,
                               snapshot_bytes)

# One small golden network per preconditioner (docs/edm.md §11).
ROUND_TRIP_CASES = ["songunet_ddpmpp_cond_edm", "songunet_ddpmpp_cond_vp", "songunet_ddpmpp_uncond_ve",
                    "songunet_ncsnpp_uncond_vp", "dhariwalunet_cond_iddpm"]


def _golden(edm_vectors, name):
    return torch.load(os.path.join(edm_vectors, f"{name}.pt"), weights_only=True)


def _golden_net(golden):
    kwargs = golden["init_kwargs"]
    net = edm_networks.PRECOND_CLASSES[kwargs["precond_class"]](**kwargs["edm_constructor_kwargs"])
    net.load_state_dict(golden["state_dict"])
    return net.eval()


@pytest.fixture(scope="module")
def small_net():
    """A tiny EDMPrecond(SongUNet) with random weights (no golden data needed)."""
    torch.manual_seed(0)
    return edm_networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, augment_dim=9,
                                   model_type="SongUNet", model_channels=8, channel_mult=[1, 2], num_blocks=1,
                                   attn_resolutions=[4], dropout=0.0).eval()


@pytest.fixture(scope="module")
def small_pickle(small_net):
    return snapshot_bytes(small_net)


def _assert_same_network(loaded, net):
    assert type(loaded) is type(net) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    ours, theirs = net.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


# ----------------------------------------------------------------------------------------------- format

@pytest.mark.parametrize("name,entry", [("songunet_ddpmpp_cond_edm", "songunet_edm_snapshot"),
                                        ("dhariwalunet_cond_iddpm", "dhariwal_iddpm_snapshot")])
def test_writer_matches_measured_edm_format(edm_vectors, name, entry):
    """The test writer emits the globals and opcodes measured on pickles written by EDM itself."""
    measured = json.load(open(os.path.join(edm_vectors, "pickle_format.json")))[entry]
    golden = _golden(edm_vectors, name)
    data = snapshot_bytes(_golden_net(golden), init_kwargs=golden["init_kwargs"]["edm_constructor_kwargs"])
    assert data[:2] == b"\x80\x04"  # protocol 4
    globals_, opcodes = scan(data)
    assert set(globals_) == set(measured["globals"])
    assert opcodes == set(measured["opcodes"])
    old_globals, _ = scan(snapshot_bytes(_golden_net(golden), release_era=True))
    assert "numpy.core.multiarray.scalar" in old_globals and "numpy._core.multiarray.scalar" not in old_globals


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_storage_payload_parser_agrees_with_torch():
    """The hand-written `_load_from_bytes` parser decodes what torch.load(weights_only=True) decodes."""
    from edm_networks.pickle_loader import _load_storage_payload
    tensor = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    rebuild, (storage, *_rest) = tensor.__reduce_ex__(4)
    _, (payload,) = storage.__reduce__()
    reference = torch.load(io.BytesIO(payload), weights_only=True)
    parsed = _load_storage_payload(payload).data
    assert torch.equal(parsed, torch.tensor(reference.tolist(), dtype=torch.float32))
    assert torch.equal(parsed.view(5, 7), tensor)
    for cut in (10, len(payload) // 2, len(payload) - 1):
        with pytest.raises(Exception, match="truncated|corrupt"):
            _load_storage_payload(payload[:cut])


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("name", ROUND_TRIP_CASES)
def test_round_trip_gives_identical_working_network(edm_vectors, tmp_path, name):
    golden = _golden(edm_vectors, name)
    net = _golden_net(golden)
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(snapshot_bytes(net, init_kwargs=golden["init_kwargs"]["edm_constructor_kwargs"]))
    loaded = load_network_pickle(path)
    assert list(loaded) == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
    ema = loaded["ema"]
    _assert_same_network(ema, net)
    assert type(ema.model).__name__ == golden["init_kwargs"]["model_class"]
    args = (golden["x"], golden["sigma"], golden["class_labels"])
    with torch.no_grad():
        out, reference = ema(*args), net(*args)
    assert torch.equal(out, reference)
    # ... and reproduces EDM's own output for these weights (docs/edm.md §10: rtol 1e-5 of max|D|).
    assert (out - golden["D"]).abs().max() <= 1e-5 * golden["D"].abs().max()


def test_release_era_pickle_with_numpy1_names_loads(small_net, tmp_path):
    """torch 1.12 / numpy 1.x spelling; numpy scalars in the constructor kwargs become Python floats."""
    kwargs = dict(small_net.init_kwargs, sigma_data=np.float64(0.5), sigma_max=float("inf"))
    data = snapshot_bytes(small_net, release_era=True, init_kwargs=kwargs, augment=False, loss="VPLoss")
    globals_, _ = scan(data)
    assert "numpy.core.multiarray.scalar" in globals_
    loaded = load_network_pickle(io.BytesIO(data))
    _assert_same_network(loaded["ema"], small_net)
    assert type(loaded["ema"].sigma_data) is float and loaded["ema"].sigma_data == 0.5
    assert loaded["ema"].sigma_max == float("inf")
    assert loaded["augment_pipe"] is None and loaded["loss_fn"].class_name == "VPLoss"


def test_inert_records_and_dataset_kwargs(small_pickle):
    loaded = load_network_pickle(io.BytesIO(small_pickle))
    loss, augment = loaded["loss_fn"], loaded["augment_pipe"]
    assert isinstance(loss, InertRecord) and loss.class_name == "EDMLoss"
    assert loss.state == dict(P_mean=-1.2, P_std=1.2, sigma_data=0.5) and loss.init_kwargs == {}
    assert isinstance(augment, InertRecord) and augment.class_name == "AugmentPipe"
    assert augment.init_kwargs["p"] == 0.12 and augment.state["translate_frac_std"] == 0.125
    assert type(loaded["dataset_kwargs"]) is dict
    assert loaded["dataset_kwargs"]["class_name"] == "training.dataset.ImageFolderDataset"


class _Unseekable(io.RawIOBase):
    """A pipe-like binary stream (no seek)."""

    def __init__(self, data):
        self._inner = io.BytesIO(data)

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._inner.readinto(buffer)


def test_paths_and_open_files(small_net, small_pickle, tmp_path):
    path = tmp_path / "edm-test.pkl"
    path.write_bytes(b"junk before" + small_pickle)
    with open(path, "rb") as f:
        f.seek(len(b"junk before"))  # reads from the current position
        _assert_same_network(load_network_pickle(f)["ema"], small_net)
    path.write_bytes(small_pickle)
    for source in (path, str(path)):
        _assert_same_network(load_network_pickle(source)["ema"], small_net)
    stream = io.BufferedReader(_Unseekable(small_pickle))
    _assert_same_network(load_network_pickle(stream)["ema"], small_net)


def test_loading_leaves_global_rng_untouched(small_pickle):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_network_pickle(io.BytesIO(small_pickle))
    assert torch.equal(torch.rand(4), expected)


def test_full_preset_pickle_loads():
    """One released configuration at full size (56M parameters)."""
    torch.manual_seed(0)
    net = build_preset("edm-cifar10-32x32-uncond-vp").eval()
    loaded = load_network_pickle(io.BytesIO(snapshot_bytes(net)))["ema"]
    _assert_same_network(loaded, net)
