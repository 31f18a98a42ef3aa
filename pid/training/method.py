"""What the trainer needs from a distillation method (PID, moment matching, ...): one loss per micro-batch."""

from typing import Dict, Protocol, Tuple, Union, runtime_checkable

import torch

__all__ = ["Method"]


@runtime_checkable
class Method(Protocol):
    """A distillation objective. The trainer owns everything else (AMP, reduction, optimizer, DDP, EMAs).

    Under torchrun the trainer passes each trainable network wrapped in DistributedDataParallel: attribute reads
    reach the network, and gradients are synchronised for calls of the network itself (`student(...)`). A method
    that gets a trainable network's gradients another way needs `--grad-sync=manual`. `teacher_forward_ad = True`
    tells the trainer's speed options that `self.teacher` is differentiated with torch.func.jvp (keep its
    attention and leave it uncompiled).

    A method may also define `to(device)`; the trainer calls it once so the method can move its teacher, and
    `prepare(run_dir, dist, log)`, which every process calls once before the first step (and again at each
    resume) to make what it needs in the run directory (moment matching's `--data=teacher` samples), and
    `state_dict()` / `load_state_dict(d)` for state of its own (running statistics), which the trainer keeps in
    the training state so that a resume stays exact.

    Several networks (e.g. moment matching's generator and auxiliary denoiser): pass `{name: module}` to
    `train`; the method then defines `phase(step) -> name` (the network step `step` updates: its optimizer
    steps, the others are left alone), `export` (the name sampled, evaluated and written to student
    checkpoints) and `ema_networks` (names that keep EMAs), and its `loss` is called as
    `loss(networks, batch_size, generator, device, micro_batch)` with a `pid.training.loop.MicroBatch`. An optional
    `lr_scale(name) -> float` multiplies the scheduled learning rate of that network (two-timescale training).
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
