"""Random-number-generator states of one process, as plain tensors (readable with weights_only=True).

The trainer's own micro-batch generator is re-seeded every step, so it needs no saving; these are the
global generators a method or a network might still use (dropout, Python's `random`, NumPy).
"""

import random

import numpy as np
import torch

__all__ = ["capture_rng", "restore_rng", "seed_process"]


def capture_rng(device: torch.device) -> dict:
    """The global torch (CPU and this CUDA device), NumPy and Python RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "python": _to_lists(random.getstate())}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """Undo `capture_rng` (states saved on another device type are restored where they apply)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(_to_tuples(state["python"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _to_lists(obj):
    return [_to_lists(x) for x in obj] if isinstance(obj, tuple) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(x) for x in obj) if isinstance(obj, list) else obj


def seed_process(seed: int, rank: int) -> None:
    """Give each process its own reproducible global streams (dropout differs across ranks, repeats across
    runs). A resumed run then overwrites them with the saved states."""
    s = (seed * 1_000_003 + rank) % (1 << 31)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
