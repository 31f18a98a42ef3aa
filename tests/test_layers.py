"""edm_networks.layers against EDM's own single-layer outputs (edm_vectors/components.pt) and EDM's rules."""

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from edm_networks import layers as L

VECTORS = os.environ.get("PID_EDM_VECTORS", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "edm_vectors"))
COMPONENTS = os.path.join(VECTORS, "components.pt")


@functools.lru_cache(maxsize=1)
def _components(path: str) -> dict:
    return torch.load(path, weights_only=True)


def _case_names() -> list:
    return sorted(_components(COMPONENTS)) if os.path.isfile(COMPONENTS) else ["<components.pt missing>"]


@pytest.mark.parametrize("name", _case_names())
def test_component_matches_edm(edm_vectors, name):
    case = _components(os.path.join(edm_vectors, "components.pt"))[name]
    inputs = case["inputs"]
    inputs = [inputs[i] for i in range(len(inputs))] if isinstance(inputs, dict) else list(inputs)
    if case["cls"] == "AttentionOp":
        out = L.AttentionOp.apply(*inputs)
    else:
        module = getattr(L, case["cls"])(**case["kwargs"])
        assert list(module.state_dict()) == list(case["state_dict"]), "state_dict keys/order differ from EDM"
        module.load_state_dict(case["state_dict"])
        module.eval()
        with torch.no_grad():
            out = module(*inputs)
    ref = case["output"]
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= 1e-5 * max(ref.abs().max().item(), 1e-6), f"{name}: max abs error {err:.3e}"


def test_weight_init_modes_and_errors():
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(0)
        w = L.weight_init([4000], "xavier_uniform", fan_in=10, fan_out=14)
        assert w.dtype == torch.float32 and w.abs().max() <= math.sqrt(6 / 24)
        w = L.weight_init([20000], "kaiming_normal", fan_in=25, fan_out=1)
        assert abs(w.std().item() - 0.2) < 0.01
    with pytest.raises(ValueError, match="invalid init mode"):
        L.weight_init([2], "orthogonal", 1, 1)


def test_bias_is_drawn_even_when_zero():
    """EDM draws the bias before scaling it by init_bias=0: later layers' init depends on it."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        layer = L.Linear(3, 2)
        after_layer = torch.rand(1)
        torch.manual_seed(3)
        weight = math.sqrt(1 / 3) * torch.randn(2, 3)
        torch.randn(2)
        expected_next = torch.rand(1)
    assert torch.equal(layer.weight.data, weight)
    assert torch.equal(layer.bias.data, torch.zeros(2))
    assert torch.equal(after_layer, expected_next)


def test_conv_resampling_rules():
    with pytest.raises(ValueError):
        L.Conv2d(2, 2, kernel=3, up=True, down=True)
    assert "resample_filter" not in L.Conv2d(2, 3, kernel=3).state_dict()
    x = torch.randn(2, 3, 8, 8)
    up = L.Conv2d(3, 3, kernel=0, up=True)
    assert torch.equal(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))  # nearest ×2
    down = L.Conv2d(3, 3, kernel=0, down=True)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=0, atol=1e-6)
    filt = L.Conv2d(3, 3, kernel=0, down=True, resample_filter=[1, 3, 3, 1]).resample_filter
    assert filt.shape == (1, 1, 4, 4) and abs(filt.sum().item() - 1) < 1e-6


def test_groupnorm_group_rule():
    assert [L.GroupNorm(c).num_groups for c in (16, 12, 6, 128, 512)] == [4, 3, 1, 32, 32]


def test_init_kwargs_records_passed_arguments_by_name():
    conv = L.Conv2d(4, 6, 3, down=True, init_mode="xavier_uniform")
    assert conv.init_kwargs == dict(in_channels=4, out_channels=6, kernel=3, down=True, init_mode="xavier_uniform")
    block = L.UNetBlock(8, 16, 12, attention=True, channels_per_head=4)
    assert block.num_heads == 4
    rebuilt = L.UNetBlock(**block.init_kwargs)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in block.state_dict().items()}


def test_unetblock_zero_heads_has_no_attention_layers():
    block = L.UNetBlock(32, 32, 8, attention=True)  # 32 // 64 = 0 heads, as DhariwalUNet at 32 channels
    assert block.num_heads == 0 and not any(k.startswith(("qkv", "proj", "norm2")) for k in block.state_dict())


def test_attention_op_half_inputs_and_gradients():
    q = torch.randn(3, 8, 10, requires_grad=True)
    k = torch.randn(3, 8, 12, requires_grad=True)
    w = L.AttentionOp.apply(q, k)
    reference = torch.einsum("bci,bcj->bij", q, k / math.sqrt(8)).softmax(dim=2)
    torch.testing.assert_close(w, reference, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(w)
    grads = torch.autograd.grad((w * upstream).sum(), [q, k])
    ref_grads = torch.autograd.grad((reference * upstream).sum(), [q, k])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    w16 = L.AttentionOp.apply(q.detach().half(), k.detach().half())
    assert w16.dtype == torch.float16
    torch.testing.assert_close(w16.float(), reference.detach(), rtol=0, atol=2e-3)


def test_embeddings_layout():
    x = torch.tensor([0.0, 1.5])
    pos = L.PositionalEmbedding(8, endpoint=True)(x)
    assert torch.equal(pos[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos first, then sin
    with torch.random.fork_rng():
        torch.manual_seed(0)
        fourier = L.FourierEmbedding(8, scale=2)
    assert list(fourier.state_dict()) == ["freqs"] and fourier.freqs.shape == (4,)
    torch.testing.assert_close(fourier(x)[1, 4:], torch.sin(1.5 * 2 * math.pi * fourier.freqs))


def test_init_kwargs_of_subclasses():
    class Plain(L.Linear):  # undecorated subclass: keeps the recorded Linear call
        pass

    @L.keeps_init_kwargs
    class Wide(L.Linear):
        def __init__(self, width: int):
            super().__init__(in_features=width, out_features=2 * width)

    assert Plain(3, 4).init_kwargs == dict(in_features=3, out_features=4)
    assert Wide(5).init_kwargs == dict(width=5)
