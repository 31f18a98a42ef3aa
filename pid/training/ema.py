"""Exponential moving averages of the student's weights, several rates at once.

As in the reference, every EMA starts from the student's initial weights (the teacher's, for PID) and is
updated after every successful optimizer step, with no warm-up: ema <- beta * ema + (1 - beta) * weights.
Buffers (e.g. running statistics, step counters) are copied from the module, not averaged.
"""

from typing import Dict, Sequence

import torch

from pid.training.config import ema_name

__all__ = ["EMAs"]


class EMAs:
    """Named EMA copies of a module's state_dict, e.g. {'0.999': {...}, '0.9999': {...}}."""

    def __init__(self, module: torch.nn.Module, betas: Sequence[float]):
        self.betas = {ema_name(b): float(b) for b in betas}
        self.states: Dict[str, Dict[str, torch.Tensor]] = {
            name: {k: v.detach().clone() for k, v in module.state_dict().items()} for name in self.betas}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """Move every EMA one step toward the module's current weights."""
        current = module.state_dict()
        params = {k for k, _ in module.named_parameters()}
        averaged = [k for k in current if k in params and current[k].is_floating_point()]
        copied = [k for k in current if k not in averaged]
        for name, beta in self.betas.items():
            state = self.states[name]
            if averaged:
                torch._foreach_lerp_([state[k] for k in averaged], [current[k].detach() for k in averaged],
                                     1.0 - beta)
            for k in copied:
                state[k].copy_(current[k])

    def state_dict(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """The EMA weights themselves (live tensors; copy before mutating)."""
        return self.states

    def load_state_dict(self, states: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Restore EMAs saved by `state_dict` (names must match the configured rates)."""
        missing = set(self.betas) - set(states)
        if missing:
            raise KeyError(f"saved EMAs lack {sorted(missing)}")
        for name in self.betas:
            for k, v in self.states[name].items():
                v.copy_(states[name][k])
