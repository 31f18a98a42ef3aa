"""Feature statistics, the Fréchet distance and the Inception Score, computed as EDM / StyleGAN compute them.

Everything here is float64 numpy or torch on the caller's device; no detector, no files except the `.npz`
statistics (keys `mu` [D] and `sigma` [D, D], float64, as EDM's `fid.py ref` writes them).
"""

import os
import tempfile
import warnings
from typing import Tuple

import numpy as np
import torch

from pid.download import cached_path, is_url
from pid.errors import CheckpointError, DataError

__all__ = ["StatsAccumulator", "frechet_distance", "inception_score", "inception_score_from_logits",
           "load_stats", "save_stats"]


class StatsAccumulator:
    """Running float64 sums of features: `S1 = Σ f` [D] and `S2 = Σ fᵀf` [D, D] over n rows (EDM fid.py).

    Sums (not running means) so that per-process partial results add up exactly under all_reduce.
    """

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = torch.device(device)
        self.n = 0
        self.sum = None    # [D] float64
        self.sumsq = None  # [D, D] float64

    @property
    def dim(self):
        """Feature dimension D, or None before the first update."""
        return None if self.sum is None else int(self.sum.shape[0])

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [N, D] (any float dtype; accumulated in float64)."""
        f = features.to(self.device, torch.float64)
        if f.ndim != 2:
            raise DataError(f"Feature batch must be [N, D]; the detector returned shape {list(features.shape)}.")
        if self.sum is None:
            self.sum = torch.zeros(f.shape[1], dtype=torch.float64, device=self.device)
            self.sumsq = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=self.device)
        self.sum += f.sum(0)
        self.sumsq += f.T @ f
        self.n += f.shape[0]

    def all_reduce(self, dim: int) -> None:
        """Sum the partial statistics of every process (call on all ranks; `dim` sizes empty ranks' buffers)."""
        import torch.distributed as dist
        if self.sum is None:
            self.sum = torch.zeros(dim, dtype=torch.float64, device=self.device)
            self.sumsq = torch.zeros(dim, dim, dtype=torch.float64, device=self.device)
        n = torch.tensor([self.n], dtype=torch.float64, device=self.device)
        for t in (n, self.sum, self.sumsq):
            dist.all_reduce(t)
        self.n = int(n.item())

    def mu_sigma(self) -> Tuple[np.ndarray, np.ndarray]:
        """`mu = S1/n` [D] and `sigma = (S2 − n·mu muᵀ)/(n − 1)` [D, D], both float64 numpy."""
        if self.n < 2:
            raise DataError(f"Statistics need at least 2 images, got {self.n}.")
        mu = self.sum / self.n
        sigma = (self.sumsq - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    """`scipy.linalg.sqrtm(matrix, disp=False)[0]` as EDM calls it, also on SciPy versions without `disp`."""
    import scipy.linalg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # `disp` is deprecated in SciPy 1.16+; same result
        try:
            return scipy.linalg.sqrtm(matrix, disp=False)[0]
        except TypeError:  # SciPy >= 1.18 removed `disp`
            return scipy.linalg.sqrtm(matrix)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between N(mu1, sigma1) and N(mu2, sigma2) exactly as EDM computes it.

    `‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2·sqrtm(sigma1·sigma2))`, with SciPy's `sqrtm` of the `np.dot` product
    and the real part of the final scalar (no eps regularisation, no imaginary-part check), so the numbers
    agree with published FIDs computed by EDM. mu: [D], sigma: [D, D].
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    shapes_ok = mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2
    if not shapes_ok:
        raise DataError(f"Statistics do not match: mu {list(mu1.shape)} / {list(mu2.shape)}, sigma "
                        f"{list(sigma1.shape)} / {list(sigma2.shape)}; both sets must come from the same detector.")
    mean_term = np.square(mu1 - mu2).sum()
    root = _sqrtm(np.dot(sigma1, sigma2))
    total = mean_term + np.trace(sigma1 + sigma2 - root * 2)
    return float(np.real(total))


def inception_score(probs, splits: int = 10) -> Tuple[float, float]:
    """Inception Score from class probabilities [N, K] (softmax of the logits), the usual 10-split convention.

    The N rows are cut into `splits` contiguous chunks `[i·N//splits, (i+1)·N//splits)`; for each chunk
    `exp(mean_x KL(p(y|x) ‖ p(y)))` with `p(y)` the chunk's mean; returns (mean, std) over chunks.
    """
    p = np.asarray(probs.detach().cpu() if torch.is_tensor(probs) else probs, dtype=np.float64)
    if p.ndim != 2 or len(p) < splits:
        raise DataError(f"Inception Score needs probabilities [N, K] with N >= splits ({splits}); "
                        f"got shape {list(p.shape)}.")
    scores = []
    for i in range(splits):
        part = p[i * len(p) // splits:(i + 1) * len(p) // splits]
        marginal = part.mean(axis=0, keepdims=True)
        # p·log(p/q) with 0·log 0 = 0: probabilities that underflow to 0 contribute nothing
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def inception_score_from_logits(logits, splits: int = 10) -> Tuple[float, float]:
    """Inception Score from logits [N, K]: softmax in float64, then `inception_score`."""
    z = torch.as_tensor(logits).detach().cpu().to(torch.float64)
    return inception_score(torch.softmax(z, dim=1).numpy(), splits)


def load_stats(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read `mu` [D] and `sigma` [D, D] (float64) from an `.npz` path or URL (cached download).

    Raises CheckpointError for a missing, corrupt or key-less file, or inconsistent shapes.
    """
    local = cached_path(path) if is_url(path) else path
    if not os.path.isfile(local):
        raise CheckpointError(f"Reference statistics '{path}' not found: give the path or URL of an .npz made "
                              f"by `fid.py ref`.")
    try:
        with np.load(local, allow_pickle=False) as data:
            content = {k: data[k] for k in data.files}
    except Exception as exc:  # numpy raises many types for a bad archive
        raise CheckpointError(f"Cannot read reference statistics '{path}' ({type(exc).__name__}: {exc}); it must "
                              f"be an .npz written by `fid.py ref` (or EDM's fid.py).") from None
    missing = [k for k in ("mu", "sigma") if k not in content]
    if missing:
        raise CheckpointError(f"Reference statistics '{path}' lack key(s) {missing} (found {sorted(content)}); "
                              f"recompute them with `fid.py ref`.")
    mu, sigma = content["mu"].astype(np.float64), content["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise CheckpointError(f"Reference statistics '{path}' have inconsistent shapes: mu {list(mu.shape)}, "
                              f"sigma {list(sigma.shape)} (expected [D] and [D, D]).")
    return mu, sigma


def save_stats(dest: str, mu: np.ndarray, sigma: np.ndarray) -> str:
    """Write `mu`/`sigma` as float64 `.npz` (keys as EDM), atomically; like `np.savez`, adds `.npz` if missing.

    Returns the path written. Parent folders are created.
    """
    if not dest.endswith(".npz"):
        dest = dest + ".npz"
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".stats-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest
