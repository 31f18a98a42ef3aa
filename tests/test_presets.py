"""Presets: released EDM configurations reproduce EDM's full-size state_dict listings (edm_vectors/keys_*.json).

Full-size networks (56-296M parameters) are built on the ``meta`` device: shapes only, no memory, no init cost.
"""

import glob
import json
import os

import pytest
import torch

from edm_networks import PRECOND_CLASSES
from edm_networks.presets import PRESETS, build_preset, list_presets, preset_kwargs

VECTORS = os.environ.get("PID_EDM_VECTORS", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "edm_vectors"))
RELEASED = [f"edm-{data}-{res}-{kind}" for data, res, kinds in [
    ("cifar10", "32x32", ["cond-vp", "cond-ve", "uncond-vp", "uncond-ve"]),
    ("ffhq", "64x64", ["uncond-vp", "uncond-ve"]),
    ("afhqv2", "64x64", ["uncond-vp", "uncond-ve"]),
    ("imagenet", "64x64", ["cond-adm"])] for kind in kinds]


def _listing_names() -> list:
    paths = sorted(glob.glob(os.path.join(VECTORS, "keys_*.json")))
    names = [os.path.basename(p)[len("keys_"):-len(".json")] for p in paths]
    return [n for n in names if n != "index"] or ["<no key listings>"]


def _meta_network(listing: dict) -> torch.nn.Module:
    """The listing's network on the meta device: through its preset when we have one, else from its kwargs."""
    name = listing["preset"]
    if name in PRESETS:
        info = preset_kwargs(name)
        assert info == {"class_name": listing["precond_class"], "kwargs": listing["edm_constructor_kwargs"]}
        assert list(info["kwargs"]) == list(listing["edm_constructor_kwargs"]), "kwargs key order differs from EDM"
        return build_preset(name, device="meta")
    with torch.device("meta"):
        return PRECOND_CLASSES[listing["precond_class"]](**listing["edm_constructor_kwargs"])


@pytest.mark.parametrize("name", _listing_names())
def test_state_dict_matches_edm_listing(edm_vectors, name):
    listing = json.load(open(os.path.join(edm_vectors, f"keys_{name}.json")))
    net = _meta_network(listing)
    state = net.state_dict()
    params = dict(net.named_parameters())
    ours = [(k, list(v.shape), "param" if k in params else "buffer") for k, v in state.items()]
    theirs = [(k, v["shape"], v["kind"]) for k, v in listing["keys"].items()]
    assert ours == theirs
    assert len(state) == listing["num_state_dict_entries"]
    assert sum(p.numel() for p in net.parameters()) == listing["num_params"]
    assert sum(b.numel() for b in net.buffers()) == listing["num_buffer_elems"]
    modules = dict(net.named_modules())
    heads = {n: m.num_heads for n, m in modules.items() if getattr(m, "num_heads", 0)}
    assert heads == listing["attention_blocks"]
    groups = sorted({m.num_groups for m in modules.values() if type(m).__name__ == "GroupNorm"})
    assert groups == listing["groupnorm_groups"]
    assert net.init_kwargs == listing["edm_constructor_kwargs"]


def test_released_presets_are_listed_with_edm_preconditioning():
    assert set(RELEASED) <= set(list_presets())
    assert list_presets() == sorted(PRESETS)
    assert all(preset_kwargs(n)["class_name"] == "EDMPrecond" for n in RELEASED)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="edm-cifar10-32x32-cond-vp"):
        preset_kwargs("edm-cifar100-32x32-cond-vp")
    with pytest.raises(ValueError, match="unknown network preset"):
        build_preset("nope", device="meta")


def test_preset_kwargs_is_a_copy():
    preset_kwargs("edm-cifar10-32x32-cond-vp")["kwargs"]["channel_mult"].append(99)
    assert preset_kwargs("edm-cifar10-32x32-cond-vp")["kwargs"]["channel_mult"] == [2, 2, 2]


@pytest.mark.parametrize("name", ["edm-cifar10-32x32-cond-ve", "edm-imagenet-64x64-cond-adm"])
def test_small_override_runs_forward(name):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = build_preset(name, img_resolution=16, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                           attn_resolutions=[8], dropout=0, label_dim=10)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = net.eval()(x, torch.tensor([0.5, 5.0]), torch.eye(10)[:2])
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert net.init_kwargs["model_channels"] == 16
