"""Seed lists in EDM's range syntax and per-seed random generators with EDM's draw order.

Every image owns one `torch.Generator` seeded with its seed, so an image depends on its seed only, never on
which other seeds share its batch (EDM's `StackedRandomGenerator`, edm.md §6.3).
"""

import re
from typing import List, Sequence, Tuple

import torch

from pid.errors import ConfigError

__all__ = ["parse_seeds", "StackedRandomGenerator", "split_seeds"]

_RANGE = re.compile(r"^(\d+)-(\d+)$")
# A list of 10^7 Python ints is ~0.4 GB; EDM's largest protocol (FID) uses 5·10^4 seeds per run.
MAX_SEEDS = 10_000_000
MAX_SEED = 1 << 63   # seeds travel as int64 tensors when split across batches and ranks


def parse_seeds(text: str) -> List[int]:
    """Parse `"0-63"`, `"1,2,5-9"` into a list of ints; ranges are inclusive, order and duplicates are kept.

    Raises `ConfigError` for anything else (negative numbers, empty items, reversed ranges, letters).
    """
    if isinstance(text, (list, tuple)):
        return [int(s) for s in text]
    seeds: List[int] = []
    for item in str(text).split(","):
        item = item.strip()
        match = _RANGE.match(item)
        if match:
            lo, hi = int(match.group(1)), int(match.group(2))
            if hi < lo:
                raise ConfigError(f"Bad seed range '{item}' in '{text}': the end must not be below the start.")
            _check_value(hi, text)
            _check_count(len(seeds) + hi - lo + 1, text)
            seeds.extend(range(lo, hi + 1))
        elif item.isdigit():
            _check_value(int(item), text)
            _check_count(len(seeds) + 1, text)
            seeds.append(int(item))
        else:
            raise ConfigError(f"Bad seed list '{text}' (item '{item}'): use non-negative integers and "
                              f"inclusive ranges separated by commas, e.g. '0-63' or '1,2,5-9'.")
    return seeds


def _check_value(seed: int, text: str) -> None:
    if seed >= MAX_SEED:
        raise ConfigError(f"Seed {seed} in '{text:.60}' is too large: seeds are 0 to {MAX_SEED - 1} (2^63 - 1).")


def _check_count(count: int, text: str) -> None:
    if count > MAX_SEEDS:
        raise ConfigError(f"Seed list '{text:.60}' has {count:,} seeds, more than the {MAX_SEEDS:,} one run "
                          f"handles; split the work into several runs with smaller ranges.")


def split_seeds(seeds: Sequence[int], batch: int, rank: int = 0, world: int = 1) -> List[Tuple[int, List[int]]]:
    """The batches of `seeds` that process `rank` of `world` generates, as EDM's generate.py splits them.

    `ceil(len/(batch*world))*world` batches of near-equal size (the first ones one larger) are dealt
    round-robin to the ranks; empty batches are dropped. Returns (global batch index, seeds) pairs, so that
    results gathered from all ranks can be put back in seed-list order.
    """
    if batch < 1:
        raise ConfigError(f"--batch must be at least 1, got {batch}.")
    num_batches = max(-(-len(seeds) // (batch * world)), 1) * world
    chunks = torch.as_tensor(list(seeds), dtype=torch.int64).tensor_split(num_batches)
    return [(i, chunks[i].tolist()) for i in range(rank, num_batches, world) if len(chunks[i]) > 0]


class StackedRandomGenerator:
    """One `torch.Generator` per seed; each draw stacks one per-seed draw along dim 0.

    Per image the draw order matches EDM: latents `randn([C,H,W])`, then the label `randint` (conditional nets),
    then one float64 `randn_like` per sampler step.
    """

    def __init__(self, device: torch.device, seeds: Sequence[int]):
        self.generators = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]

    def _check(self, size) -> None:
        if size[0] != len(self.generators):
            raise ValueError(f"first dimension {size[0]} must equal the number of seeds {len(self.generators)}")

    def randn(self, size, **kwargs) -> torch.Tensor:
        """Standard normal [len(seeds), *size[1:]]."""
        self._check(size)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal with x's shape, dtype, layout and device (float64 inside the samplers)."""
        return self.randn(x.shape, dtype=x.dtype, layout=x.layout, device=x.device)

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        """`torch.randint(*args, size=size[1:])` per seed, stacked: `randint(label_dim, size=[B])` -> [B]."""
        self._check(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])
