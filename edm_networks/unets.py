"""EDM's two backbones: ``SongUNet`` (DDPM++ / NCSN++, Song et al. 2021) and ``DhariwalUNet`` (ADM,
Dhariwal & Nichol 2021), with EDM's constructor arguments, module names and forward semantics
(``docs/edm.md`` §2). Both map ``(x [N, in, H, W], noise_labels [N], class_labels [N, label_dim] | None)``
to ``[N, out, H, W]``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock, keeps_init_kwargs

__all__ = ["SongUNet", "DhariwalUNet"]


def _drop_labels(labels: torch.Tensor, p: float, training: bool, batch: int) -> torch.Tensor:
    """Zero each sample's label row with probability ``p`` (training only; classifier-free style dropout)."""
    if training and p:
        keep = torch.rand([batch, 1], device=labels.device) >= p
        labels = labels * keep.to(labels.dtype)
    return labels


def output_in_fp32(layer, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in float32 even inside ``torch.autocast``; plain ``layer(x)`` outside it.

    The output layers (final GroupNorm, SiLU, conv) run this way, as the fp16 U-Nets of guided diffusion and
    consistency models keep their ``out`` layers in fp32: an fp16/bf16 output is rounded to 2^-11 / 2^-8
    relative, and PID's finite difference multiplies that rounding by t/(t − t′) (11–46 on its N = 250 grid).
    """
    if not torch.is_autocast_enabled(x.device.type):
        return layer(x)
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


@keeps_init_kwargs
class SongUNet(torch.nn.Module):
    """DDPM++ (``embedding_type='positional'``, standard encoder) and NCSN++ (``'fourier'``, residual encoder)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1)):
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(f'SongUNet: embedding_type must be "fourier" or "positional", got "{embedding_type}"')
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f'SongUNet: encoder_type must be standard/skip/residual, got "{encoder_type}"')
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f'SongUNet: decoder_type must be standard/skip, got "{decoder_type}"')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network; construction order = state_dict order = RNG order.
        self.map_noise = (PositionalEmbedding(num_channels=noise_channels, endpoint=True)
                          if embedding_type == "positional" else FourierEmbedding(num_channels=noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        cout, skips = self._build_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                          attn_resolutions, encoder_type, resample_filter, init, block_kwargs)
        self._build_decoder(img_resolution, out_channels, model_channels, channel_mult, num_blocks,
                            attn_resolutions, decoder_type, resample_filter, init_zero, block_kwargs, cout, skips)

    def _build_encoder(self, img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                       encoder_type, resample_filter, init, block_kwargs) -> tuple:
        """Create ``self.enc``; return (its output width, the skip widths the decoder will consume)."""
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]
        return cout, skips

    def _build_decoder(self, img_resolution, out_channels, model_channels, channel_mult, num_blocks,
                       attn_resolutions, decoder_type, resample_filter, init_zero, block_kwargs, cout, skips) -> None:
        """Create ``self.dec``, consuming the encoder's skip widths from the end."""
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions  # only a level's last block
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
               augment_labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, batch)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[N, in, H, W]``, noise_labels ``[N]`` (or ``[1]``), class_labels ``[N|1, label_dim]`` or None."""
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = tmp = None
        for name, block in self.dec.items():  # the aux path is the output: float32 (see output_in_fp32)
            if "aux_up" in name:
                aux = output_in_fp32(block, aux)
            elif "aux_norm" in name:
                tmp = output_in_fp32(block, x)
            elif "aux_conv" in name:
                tmp = output_in_fp32(lambda h: block(F.silu(h)), tmp)
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux  # the output is the aux path, not x


@keeps_init_kwargs
class DhariwalUNet(torch.nn.Module):
    """ADM backbone (improved DDPM / guided diffusion) with adaptive-scale blocks and multi-head attention."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                            init_zero=init_zero)

        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        cout, skips = self._build_encoder(img_resolution, in_channels, model_channels, channel_mult, num_blocks,
                                          attn_resolutions, init, block_kwargs)
        self._build_decoder(img_resolution, out_channels, model_channels, channel_mult, num_blocks,
                            attn_resolutions, init_zero, block_kwargs, cout, skips)

    def _build_encoder(self, img_resolution, in_channels, model_channels, channel_mult, num_blocks, attn_resolutions,
                       init, block_kwargs) -> tuple:
        """Create ``self.enc``; return (its output width, the skip widths: every encoder output)."""
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]
        return cout, skips

    def _build_decoder(self, img_resolution, out_channels, model_channels, channel_mult, num_blocks,
                       attn_resolutions, init_zero, block_kwargs, cout, skips) -> None:
        """Create ``self.dec`` and the output layers ``out_norm``/``out_conv``."""
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def _embed(self, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
               augment_labels: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        emb = self.map_noise(noise_labels)  # [cos, sin], no swap (unlike SongUNet)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:  # unscaled labels, added after map_layer1
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training, batch))
        return F.silu(emb)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: Optional[torch.Tensor],
                augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x ``[N, in, H, W]``, noise_labels ``[N]`` (or ``[1]``), class_labels ``[N|1, label_dim]`` or None."""
        emb = self._embed(noise_labels, class_labels, augment_labels, x.shape[0])
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return output_in_fp32(lambda h: self.out_conv(F.silu(self.out_norm(h))), x)
