"""EDM-compatible networks and a safe loader for EDM network pickles (imports torch only)."""

from .layers import (AttentionOp, Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding, UNetBlock,
                     weight_init, ATTENTION_IMPLS, set_attention)
from .unets import DhariwalUNet, SongUNet
from .precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond
from .classes import BACKBONE_CLASSES, NETWORK_CLASSES, PRECOND_CLASSES
from .presets import PRESETS, build_preset, list_presets, preset_kwargs
from .pickle_loader import InertRecord, NetworkPickleError, UnsafePickleError, load_network_pickle
