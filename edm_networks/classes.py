"""Name -> class tables for EDM's persistent network classes (used to rebuild networks from pickles/checkpoints).

Only these names may be instantiated from a file: everything else is refused by the loaders.
"""

from __future__ import annotations

from .layers import Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock
from .precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from .unets import DhariwalUNet, SongUNet

__all__ = ["NETWORK_CLASSES", "PRECOND_CLASSES", "BACKBONE_CLASSES"]

PRECOND_CLASSES: dict = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)}
BACKBONE_CLASSES: dict = {cls.__name__: cls for cls in (SongUNet, DhariwalUNet)}
NETWORK_CLASSES: dict = {
    **PRECOND_CLASSES,
    **BACKBONE_CLASSES,
    **{cls.__name__: cls for cls in (UNetBlock, Conv2d, Linear, GroupNorm, PositionalEmbedding, FourierEmbedding)},
}
