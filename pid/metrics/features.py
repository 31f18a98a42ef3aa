"""Run a detector over an image set and accumulate FID statistics, split across processes as EDM's fid.py does.

Batching follows EDM: `ceil(n/(batch·world))·world` near-equal batches of `arange(n)` (the first ones one
larger), dealt round-robin to the ranks; per-rank float64 sums are all-reduced at the end.
"""

import math
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from pid.errors import DataError, PidError
from pid.metrics.inception import Detector
from pid.metrics.stats import StatsAccumulator

__all__ = ["dist_info", "rank_batches", "gather_rows", "compute_statistics"]


def dist_info():
    """(rank, world) of the initialised default process group, else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_batches(n: int, batch: int, rank: int = 0, world: int = 1) -> List[List[int]]:
    """Image indices of each batch that process `rank` handles (EDM's split; empty batches dropped)."""
    num_batches = max(math.ceil(n / (batch * world)), 1) * world
    chunks = torch.arange(n).tensor_split(num_batches)
    return [c.tolist() for c in chunks[rank::world] if len(c) > 0]


def _reraise_clean(exc: PidError):
    """A PidError raised inside a DataLoader worker arrives with the worker's traceback in its message: keep the
    original one-line message so the CLI prints one line."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else ""
    message = last.split(": ", 1)[1] if "Error: " in last and len(lines) > 1 else str(exc)
    raise type(exc)(message) from None


def gather_rows(rows: List[np.ndarray], indices: List[int], n: int) -> Optional[np.ndarray]:
    """All ranks' per-image rows (e.g. class probabilities) in image order; on one process just the rows."""
    import torch.distributed as dist
    local = (indices, np.concatenate(rows) if rows else None)
    rank, world = dist_info()
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    width = next(p[1].shape[1] for p in parts if p[1] is not None)
    out = np.zeros([n, width], dtype=np.float64)
    for idx, values in parts:
        if values is not None:
            out[idx] = values
    return out


def compute_statistics(detector: Detector, dataset: torch.utils.data.Dataset, *, batch: int = 64,
                       workers: int = 0, with_probs: bool = False, with_features: bool = True,
                       expect_dim: Optional[int] = None, progress: bool = True) -> dict:
    """Feature statistics of every image of `dataset` (items: uint8 [C, H, W]) as EDM computes them.

    Returns `{'mu': [D] f64, 'sigma': [D, D] f64, 'n': int, 'probs': [n, K] f64 or None}` on every rank
    (`probs` with `with_probs`, in image order; mu/sigma are None with `with_features=False`).
    expect_dim: feature size the caller's reference statistics have; a detector giving another size raises
    DataError at the first batch instead of after the whole pass.
    """
    rank, world = dist_info()
    batches = rank_batches(len(dataset), batch, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         prefetch_factor=2 if workers > 0 else None)
    acc = StatsAccumulator(detector.device)
    probs, done = [], []
    try:
        for images, idx in zip(tqdm(loader, unit="batch", disable=not progress or rank != 0), batches):
            if with_features:
                feats = detector.features(images)
                if expect_dim is not None and feats.shape[1] != expect_dim:
                    raise DataError(
                        f"The detector gives {feats.shape[1]}-dimensional features but the reference statistics "
                        f"are {expect_dim}-dimensional: compute both with the same --detector.")
                acc.update(feats)
            if with_probs:
                probs.append(detector.probs(images).cpu().numpy())
            done.extend(idx)
    except PidError as exc:
        _reraise_clean(exc)
    mu = sigma = None
    if with_features:
        if world > 1:
            dim = torch.tensor([acc.dim or 0], device=detector.device)
            torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
            acc.all_reduce(int(dim.item()))
        mu, sigma = acc.mu_sigma()
    n = len(dataset)
    return dict(mu=mu, sigma=sigma, n=n, probs=gather_rows(probs, done, n) if with_probs else None)
