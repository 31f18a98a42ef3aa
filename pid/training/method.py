"""What the trainer needs from a distillation method (PID, moment matching, ...): one loss per micro-batch."""

from typing import Dict, Protocol, Tuple, Union, runtime_checkable

import torch

__all__ = ["Method"]


@runtime_checkable
class Method(Protocol):
    """A distillation objective. The trainer owns everything else (AMP, reduction, optimizer, DDP, EMAs).

    A method may also define `to(device)`; the trainer calls it once so the method can move its teacher.
    """

    name: str

    def loss(self, student: torch.nn.Module, batch_size: int, generator: torch.Generator,
             device: torch.device) -> Tuple[torch.Tensor, Dict[str, Union[float, torch.Tensor]]]:
        """Per-sample losses [batch_size] (with grad) and scalar stats for logging.

        A stat may be a Python number or a 0-dim tensor on `device`; prefer tensors on GPU: the trainer sums them
        on the device, whereas turning one into a float here would stall the GPU between forward and backward.

        All randomness of the micro-batch must come from `generator` (on `device`); the trainer runs this
        under autocast for fp16/bf16, so the method must not enable autocast itself.
        """
        ...

    def config_dict(self) -> dict:
        """JSON-able settings, saved in config.json and compared when a run is resumed."""
        ...
