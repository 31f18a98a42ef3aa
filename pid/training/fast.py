"""The trainer's speed options (GPU fast paths), applied to the networks.

- `attention='sdpa'`: every EDM UNetBlock computes attention with `scaled_dot_product_attention` (fused
  flash / memory-efficient kernels on CUDA) instead of EDM's float32 AttentionOp (`edm_networks.set_attention`).
- `channels_last`: parameters of 4-D convolutions in NHWC order, which cuDNN's tensor-core kernels prefer for
  fp16/bf16; activations follow the weights.
- `compile`: `torch.compile` of what the method calls for each trainable network (the bare network keeps its
  state_dict keys and stays eager for grids and evaluation), and `Module.compile()` of the teacher in place.
Off (the defaults), nothing here touches a network. The teacher of a method that differentiates it in forward
mode (`method.teacher_forward_ad`, moment matching's Algorithm 3) keeps EDM's attention and is not compiled:
SDPA has no forward-mode derivative on every backend.
"""

from typing import Dict, List

import torch

from pid.training.config import TrainConfig

__all__ = ["prepare_networks", "frozen_modules", "compiled", "COMPILE_OPTIONS"]

# Keyword arguments of every torch.compile call (tests use {'backend': 'eager'}: no C++ compiler needed).
COMPILE_OPTIONS: dict = {}


def frozen_modules(method) -> List[torch.nn.Module]:
    """The method's non-trainable networks the fast paths may change (its teacher, if it is a module)."""
    teacher = getattr(method, "teacher", None)
    if isinstance(teacher, torch.nn.Module) and not getattr(method, "teacher_forward_ad", False):
        return [teacher]
    return []


def prepare_networks(nets: Dict[str, torch.nn.Module], method, config: TrainConfig) -> None:
    """Attention kernel and memory format of the trainable networks and the method's teacher (on their device)."""
    from edm_networks import set_attention
    for module in [*nets.values(), *frozen_modules(method)]:
        if config.attention != "edm":
            set_attention(module, config.attention)
        if config.channels_last:
            module.to(memory_format=torch.channels_last)


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """`torch.compile(module)`: a wrapper that runs the compiled graph; `module` itself (its state_dict keys, its
    deep copies for grids and evaluation) stays eager."""
    return torch.compile(module, **COMPILE_OPTIONS)
