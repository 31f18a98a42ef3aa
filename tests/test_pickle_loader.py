"""Tests of edm_networks.load_network_pickle: EDM-format pickles written by edm_networks/pickle_writer.py load
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
from edm_networks.pickle_writer import (GlobalRef, Reduced, dumps, module_record, persistent, scan, snapshot,
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
    assert all(t.device.type == "cpu" for t in list(loaded.parameters()) + list(loaded.buffers()))
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


# ------------------------------------------------------------------------------------- hostile pickles

def _write_code(marker):
    return f"open({str(marker)!r}, 'w').write('pwned')"


HOSTILE_CALLS = [
    ("os", "system", lambda m: (f"touch {m}",)),
    ("posix", "system", lambda m: (f"touch {m}",)),
    ("builtins", "eval", lambda m: (_write_code(m),)),
    ("builtins", "exec", lambda m: (_write_code(m),)),
    ("subprocess", "check_call", lambda m: (["touch", str(m)],)),
    ("subprocess", "Popen", lambda m: (["touch", str(m)],)),
    ("subprocess", "run", lambda m: (["touch", str(m)],)),
    ("torch", "load", lambda m: (str(m),)),
    ("numpy", "load", lambda m: (str(m),)),
]


@pytest.mark.parametrize("protocol", [4, 2, 0])
@pytest.mark.parametrize("module,name,args", HOSTILE_CALLS, ids=[f"{m}.{n}" for m, n, _ in HOSTILE_CALLS])
def test_hostile_global_is_refused_and_runs_nothing(tmp_path, module, name, args, protocol):
    marker = tmp_path / "pwned"
    data = dumps(Reduced(GlobalRef(module, name), args(marker)), protocol=protocol)
    if protocol == 0:  # header-less protocols are refused before any opcode is read
        with pytest.raises(NetworkPickleError, match="not a pickle file of protocol 2 or newer"):
            load_network_pickle(io.BytesIO(data))
    else:
        with pytest.raises(UnsafePickleError, match=f"'{module}.{name}'"):
            load_network_pickle(io.BytesIO(data))
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "exec"), ("subprocess", "check_call")])
def test_hostile_payloads_are_live_under_plain_pickle(tmp_path, module, name):
    """Control: the same bytes DO run their payload under pickle.loads, so the refusal above is meaningful."""
    marker = tmp_path / "pwned"
    args = dict((c[0] + c[1], c[2]) for c in HOSTILE_CALLS)[module + name](marker)
    pickle.loads(dumps(Reduced(GlobalRef(module, name), args)))
    assert marker.exists()


def test_hostile_global_deep_inside_a_valid_snapshot_is_refused(small_net, tmp_path):
    marker = tmp_path / "pwned"
    snap = snapshot(small_net)
    block = snap["ema"].args[0]["state"]["_modules"]["model"].args[0]["state"]
    block["evil"] = Reduced(GlobalRef("os", "system"), (f"touch {marker}",))
    with pytest.raises(UnsafePickleError, match="'os.system'"):
        load_network_pickle(io.BytesIO(dumps(snap)))
    assert not marker.exists()


@pytest.mark.parametrize("where", ["ema", "loss_fn", "submodule"])
def test_unknown_persistent_class_is_refused_and_its_source_never_runs(small_net, tmp_path, where):
    marker = tmp_path / "pwned"
    source = _write_code(marker) + "\nclass Exploit:\n    pass\n"
    evil = persistent("Exploit", {"_init_args": (), "_init_kwargs": {}}, module_src=source)
    snap = snapshot(small_net)
    if where == "submodule":
        snap["ema"].args[0]["state"]["_modules"]["model"].args[0]["state"]["_modules"]["map_layer0"] = evil
    else:
        snap[where] = evil
    path = tmp_path / "network-snapshot-000000.pkl"
    path.write_bytes(dumps(snap))
    with pytest.raises(UnsafePickleError, match="'Exploit'") as info:
        load_network_pickle(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    exec(compile(source, "<control>", "exec"), {})  # control: the embedded source really would write the file
    assert marker.exists()


def test_known_classes_with_hostile_source_load_without_running_it(small_net, tmp_path):
    marker = tmp_path / "pwned"
    data = snapshot_bytes(small_net, module_src=_write_code(marker) + "\n")
    _assert_same_network(load_network_pickle(io.BytesIO(data))["ema"], small_net)
    assert not marker.exists()


def test_persistent_ids_are_refused():
    data = b"\x80\x02X\x03\x00\x00\x00abcQ."  # PROTO 2, BINUNICODE 'abc', BINPERSID, STOP
    with pytest.raises(UnsafePickleError, match="persistent id"):
        load_network_pickle(io.BytesIO(data))


# ---------------------------------------------------------------------------------------- clear errors

def _load_error(source):
    with pytest.raises(NetworkPickleError) as info:
        load_network_pickle(source)
    assert not isinstance(info.value, UnsafePickleError)
    if isinstance(source, (str, pathlib.Path)):
        assert str(source) in str(info.value)  # every message names the file
    return str(info.value)


def test_missing_empty_directory_and_text_mode(tmp_path):
    assert "not found" in _load_error(tmp_path / "edm-missing.pkl")
    assert "directory" in _load_error(tmp_path)
    (tmp_path / "empty.pkl").write_bytes(b"")
    assert "empty" in _load_error(tmp_path / "empty.pkl")
    (tmp_path / "x.pkl").write_bytes(b"\x80\x04.")
    with open(tmp_path / "x.pkl", "r", encoding="latin-1") as f:
        assert "text mode" in _load_error(f)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + bytes(100), b"<!DOCTYPE html><html>Not Found</html>",
                                     b"hello world\n", b"\x1f\x8b\x08\x00" + bytes(50)])
def test_not_a_pickle(tmp_path, content):
    path = tmp_path / "edm-cifar10.pkl"
    path.write_bytes(content)
    assert "not a pickle file" in _load_error(path)


def test_truncated_file_at_many_points(small_pickle, tmp_path):
    path = tmp_path / "network-snapshot-000000.pkl"
    for cut in list(range(3, len(small_pickle), len(small_pickle) // 23)) + [len(small_pickle) - 1]:
        path.write_bytes(small_pickle[:cut])
        message = _load_error(path)
        assert "truncated" in message, (cut, message)


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_file_is_named_as_such(small_net, tmp_path, zip_format):
    path = tmp_path / "training-state-000000.pt"
    torch.save({"net": small_net.state_dict(), "optimizer_state": {}}, path,
               _use_new_zipfile_serialization=zip_format)
    message = _load_error(path)
    assert "torch.save" in message and "training-state-*.pt" in message and "network-snapshot" in message


def test_pickle_without_ema_or_with_a_non_network_ema(small_net, tmp_path):
    path = tmp_path / "snap.pkl"
    snap = snapshot(small_net)
    ema = snap.pop("ema")
    path.write_bytes(dumps(snap))
    assert "no 'ema' network" in _load_error(path) and "'loss_fn'" in _load_error(path)
    path.write_bytes(dumps(dict(snap, ema=snap["loss_fn"])))
    assert "'ema' is a EDMLoss" in _load_error(path)
    path.write_bytes(dumps([ema]))
    assert "holds a list" in _load_error(path)
    path.write_bytes(dumps({"ema": module_record(small_net.model)}))  # a bare backbone, not a preconditioner
    assert "'ema' is a SongUNet" in _load_error(path)


def test_arguments_that_do_not_match_the_tensors(small_net, tmp_path):
    path = tmp_path / "snap.pkl"
    path.write_bytes(snapshot_bytes(small_net, init_kwargs=dict(small_net.init_kwargs, model_channels=16)))
    assert "shape" in _load_error(path)
    path.write_bytes(snapshot_bytes(small_net, init_kwargs=dict(small_net.init_kwargs, bogus_option=1)))
    assert "cannot be rebuilt" in _load_error(path) and "bogus_option" in _load_error(path)
    path.write_bytes(snapshot_bytes(small_net, init_kwargs=dict(small_net.init_kwargs, label_dim=0)))
    assert "missing model.map_label.weight" in _load_error(path) or "unexpected" in _load_error(path)


def test_corrupt_records_and_tensors(small_net, tmp_path):
    path = tmp_path / "snap.pkl"
    snap = snapshot(small_net)
    snap["ema"].args[0]["version"] = 5
    path.write_bytes(dumps(snap))
    assert "version" in _load_error(path)
    snap = snapshot(small_net)
    rebuild, (storage, *_rest) = torch.zeros(4).__reduce_ex__(4)
    params = snap["ema"].args[0]["state"]["_modules"]["model"].args[0]["state"]["_modules"]["map_layer0"]
    params.args[0]["state"]["_parameters"]["weight"] = Reduced(rebuild, (storage, 0, (100,), (1,), False,
                                                                         collections.OrderedDict()))
    path.write_bytes(dumps(snap))
    assert "does not fit" in _load_error(path)


def test_build_opcodes_cannot_rename_records_or_touch_tensors(small_net, tmp_path):
    """BUILD after a checked record (to rename it) or on a rebuilt tensor is refused as corrupt."""
    path = tmp_path / "snap.pkl"
    snap = snapshot(small_net)
    loss = snap["loss_fn"]
    snap["loss_fn"] = Reduced(loss.func, loss.args, state=(None, {"class_name": "Exploit"}))
    path.write_bytes(dumps(snap))
    assert "BUILD" in _load_error(path)
    snap = snapshot(small_net)
    rebuild, args = torch.zeros(4).__reduce_ex__(4)
    snap["dataset_kwargs"]["t"] = Reduced(rebuild, args, state=(torch.zeros(1), 0, (1,), (1,)))
    path.write_bytes(dumps(snap))
    assert "BUILD" in _load_error(path)


def test_cyclic_record_tree_is_corrupt_not_a_crash(small_net, tmp_path):
    snap = snapshot(small_net)
    state = snap["ema"].args[0]["state"]
    state["_modules"]["loop"] = persistent("Linear", state)  # a module that contains itself
    path = tmp_path / "snap.pkl"
    path.write_bytes(dumps(snap))
    assert "corrupt" in _load_error(path)


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_storage_payload_claiming_huge_size_is_refused_before_allocating():
    from edm_networks.pickle_loader import _FormatError, _load_storage_payload

    class StorageIdPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return obj if isinstance(obj, tuple) and obj[:1] == ("storage",) else None

    numel = 2 ** 60
    parts = [pickle.dumps(v, protocol=2) for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True})]
    buf = io.BytesIO()
    StorageIdPickler(buf, protocol=2).dump(("storage", torch.FloatStorage, "0", "cpu", numel, None))
    payload = b"".join(parts) + buf.getvalue() + pickle.dumps(["0"], protocol=2) + numel.to_bytes(8, "little")
    with pytest.raises(_FormatError, match=f"{numel} of {numel} elements"):
        _load_storage_payload(payload + bytes(64))


def _laughs(levels: int) -> list:
    nest = ["lol"]
    for _ in range(levels):
        nest = [nest, nest]   # each level references the one below twice: 2^levels items when expanded
    return nest


@pytest.mark.parametrize("levels, message", [(18, None), (30, "expand to more than"), (80, "levels deep")])
def test_shared_nesting_is_linear_time(small_net, tmp_path, levels, message):
    """'Billion laughs': shared lists are converted once; what would expand absurdly is refused, fast."""
    import time
    snap = snapshot(small_net)
    snap["dataset_kwargs"]["nest"] = _laughs(levels)
    path = tmp_path / "laughs.pkl"
    path.write_bytes(dumps(snap))
    start = time.perf_counter()
    if message is None:
        nest = load_network_pickle(path)["dataset_kwargs"]["nest"]
        assert nest[0] is nest[1]   # sharing is kept, not expanded
    else:
        assert message in _load_error(path)
    assert time.perf_counter() - start < 5


def test_shared_submodule_is_refused(small_net, tmp_path):
    snap = snapshot(small_net)
    modules = snap["ema"].args[0]["state"]["_modules"]
    modules["twin"] = modules["model"]
    path = tmp_path / "snap.pkl"
    path.write_bytes(dumps(snap))
    assert "more than once" in _load_error(path)
