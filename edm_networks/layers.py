"""Building blocks of EDM's networks (Karras et al. 2022, NVlabs/edm ``training/networks.py``).

Class names, constructor argument names, defaults, submodule order (= state_dict keys and the order in
which initialisation draws from torch's global RNG) follow EDM exactly, so that an EDM pickle's
``_init_kwargs`` and tensors map 1:1 onto these classes. Numerics follow ``docs/edm.md`` §1 and §10.7:
matmul and bias add are separate ops, resampling is a depthwise conv, attention runs in float32.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "keeps_init_kwargs", "weight_init", "Linear", "Conv2d", "GroupNorm", "AttentionOp", "UNetBlock",
    "PositionalEmbedding", "FourierEmbedding", "ATTENTION_IMPLS", "set_attention",
]

# How UNetBlock computes self-attention: 'edm' (AttentionOp: float32 softmax, forward-mode derivatives) or 'sdpa'
# (torch.nn.functional.scaled_dot_product_attention: fused flash/memory-efficient kernels on CUDA, in the input's
# dtype). Not a constructor argument, so that pickles and init kwargs stay EDM's.
ATTENTION_IMPLS = ("edm", "sdpa")


def keeps_init_kwargs(cls: type) -> type:
    """Class decorator: record the constructor arguments as ``self.init_kwargs`` (a deep-copied dict).

    Positional arguments are stored under their parameter names and ``**kwargs`` are flattened, so that
    ``type(m)(**m.init_kwargs)`` rebuilds an identical architecture. Only arguments actually passed are
    recorded (like EDM's ``_init_kwargs``); defaults are left to the class.
    """
    original_init = cls.__init__
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        recorded: dict = {}
        for name, value in list(bound.arguments.items())[1:]:
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        original_init(self, *args, **kwargs)
        # Set after the body runs, so a decorated subclass (whose wrapper finishes last) records its own call.
        self.init_kwargs = copy.deepcopy(recorded)

    cls.__init__ = __init__
    return cls


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """Draw an f32 tensor of ``shape`` from torch's global RNG with EDM's init rule ``mode``.

    Modes: ``xavier_uniform``, ``xavier_normal``, ``kaiming_uniform``, ``kaiming_normal``.
    The caller multiplies by ``init_weight`` / ``init_bias``.
    """
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'invalid init mode "{mode}": expected xavier_uniform, xavier_normal, '
                     "kaiming_uniform or kaiming_normal")


@keeps_init_kwargs
class Linear(torch.nn.Module):
    """Fully connected layer: ``[N, in_features] -> [N, out_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1, init_bias: float = 0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))  # separate add, as EDM (no fused addmm): bitwise parity
        return x


@keeps_init_kwargs
class Conv2d(torch.nn.Module):
    """2D convolution with optional ×2 up/down resampling by a separable FIR filter.

    ``kernel=0`` gives a pure resampler (no weight). Input ``[N, in, H, W]``; output ``[N, out, H', W']``
    with ``H' = 2H`` (up), ``H/2`` (down) or ``H``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1, init_bias: float = 0):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                          * init_weight) if kernel else None)
        self.bias = (torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        f = f.outer(f).unsqueeze(0).unsqueeze(1) / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        cin, cout = self.in_channels, self.out_channels
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([cin, 1, 1, 1]), groups=cin, stride=2,
                                   padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([cout, 1, 1, 1]), groups=cout, stride=2)
        else:
            if self.up:  # ×4 keeps the mean: each output pixel receives a quarter of the filter taps
                x = F.conv_transpose2d(x, f.mul(4).tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([cin, 1, 1, 1]), groups=cin, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x


@keeps_init_kwargs
class GroupNorm(torch.nn.Module):
    """Group normalisation with EDM's group rule ``min(num_groups, num_channels // min_channels_per_group)``."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
                            bias=self.bias.to(x.dtype), eps=self.eps)


class AttentionOp(torch.autograd.Function):
    """Attention weights ``w[b, i, j] = softmax_j(sum_c q[b, c, i] k[b, c, j] / sqrt(c))``, always in f32.

    ``q``: ``[B, c, Nq]``, ``k``: ``[B, c, Nk]`` -> ``[B, Nq, Nk]`` in q's dtype. Forward and backward both
    run in float32 so that fp16 networks keep a stable softmax. `jvp` gives forward-mode derivatives, which
    moment matching's Algorithm 3 needs for a parameter-space Jacobian-vector product (torch.func.jvp).
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        scale = math.sqrt(k.shape[1])
        w = torch.einsum("bci,bcj->bij", q.to(torch.float32), (k / scale).to(torch.float32))
        return w.softmax(dim=2).to(q.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        q, k = inputs
        ctx.save_for_backward(q, k, output)
        ctx.save_for_forward(q, k, output)

    @staticmethod
    def backward(ctx: Any, dw: torch.Tensor):
        q, k, w = ctx.saved_tensors
        w32 = w.to(torch.float32)
        dw32 = dw.to(torch.float32)
        # Softmax Jacobian-vector product: d logits = w * (dw - <dw, w>_j).
        dlogits = w32 * (dw32 - (dw32 * w32).sum(dim=2, keepdim=True))
        scale = math.sqrt(k.shape[1])
        dq = torch.einsum("bcj,bij->bci", k.to(torch.float32), dlogits) / scale
        dk = torch.einsum("bci,bij->bcj", q.to(torch.float32), dlogits) / scale
        return dq.to(q.dtype), dk.to(k.dtype)

    @staticmethod
    def jvp(ctx: Any, dq: Optional[torch.Tensor], dk: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, w = ctx.saved_tensors
        f32 = torch.float32
        dlogits = torch.zeros_like(w, dtype=f32)
        if dq is not None:
            dlogits = dlogits + torch.einsum("bci,bcj->bij", dq.to(f32), k.to(f32))
        if dk is not None:
            dlogits = dlogits + torch.einsum("bci,bcj->bij", q.to(f32), dk.to(f32))
        dlogits = dlogits / math.sqrt(k.shape[1])
        w32 = w.to(f32)
        return (w32 * (dlogits - (dlogits * w32).sum(dim=2, keepdim=True))).to(w.dtype)


@keeps_init_kwargs
class UNetBlock(torch.nn.Module):
    """Residual U-Net block with noise-embedding modulation and optional self-attention.

    forward(x ``[N, in, H, W]``, emb ``[N or 1, emb_channels]``) -> ``[N, out, H', W']``.
    ``attention_impl`` ('edm' or 'sdpa', see `set_attention`) selects how attention is computed.
    """

    attention_impl = "edm"

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: Optional[int] = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict = dict(), init_zero: dict = dict(init_weight=0), init_attn: Optional[dict] = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else (
            num_heads if num_heads is not None else out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None
                                                                            else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x.add_(params)))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            x = self._attention(x)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        # qkv channels are interleaved per head as head*3*hd + 3*c + s (s = q, k, v): reshape, not chunk.
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
        if self.attention_impl == "sdpa":
            # [b, c, N] -> [b, N, c]: SDPA's scale is 1/sqrt(c) as EDM's; softmax in the input dtype
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            a = a.transpose(1, 2)
        else:
            weights = AttentionOp.apply(q, k)
            a = torch.einsum("bij,bcj->bci", weights, v)
        x = self.proj(a.reshape(n, c, h, w)).add_(x)
        return x * self.skip_scale


def set_attention(module: torch.nn.Module, impl: str) -> int:
    """Make every UNetBlock inside `module` use attention `impl` ('edm' or 'sdpa'); returns how many blocks have
    attention. 'sdpa' matches 'edm' to float32 rounding (tests/test_networks.py) and has no forward-mode
    derivative on every backend: keep 'edm' for networks differentiated with torch.func.jvp."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose one of {ATTENTION_IMPLS}")
    count = 0
    for m in module.modules():
        if isinstance(m, UNetBlock):
            m.attention_impl = impl
            count += bool(m.num_heads)
    return count


@keeps_init_kwargs
class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of a vector of scalars: ``[B] -> [B, num_channels]`` as ``[cos, sin]``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs  # computed in f32 as EDM does, then cast
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@keeps_init_kwargs
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features: ``[B] -> [B, num_channels]`` as ``[cos, sin]``; ``freqs ~ N(0, scale²)``."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 2π·freqs is formed in the buffer's f32 first: arguments reach ~3e5 for VP, so order matters.
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
