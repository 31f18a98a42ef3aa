"""Evaluation during training: score the (EMA) student on fixed seeds every `--eval-every` steps.

Two modes, chosen once by `make_evaluator`:
* FID (and IS) against reference statistics (`fid_ref`): images from seeds `seed0 .. seed0+num-1`, EDM's uint8
  quantisation, the same detector and statistics as `fid.py calc`.
* Exact metrics for a built-in analytic teacher (no download): RMSE to the teacher's reference ODE endpoint of
  the same noise, component accuracy and log-likelihood (`pid.exact_eval`); the endpoints are computed once.
  A stochastic generator (attribute `stochastic = True`, e.g. a moment-matching student) has no per-seed
  endpoint: its images are scored as a set against the exact target distribution (`distribution_metrics`).

Stochastic generators get `randn_like` from the seed's own generator, drawn after the latents and the label
(EDM's order), so their images, too, depend on the seed only, never on the batch.
"""

from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from pid.errors import ConfigError
from pid.metrics.inception import load_detector
from pid.metrics.stats import StatsAccumulator, frechet_distance, inception_score, load_stats
from pid.metrics.features import gather_rows, rank_batches
from pid.seeds import StackedRandomGenerator

__all__ = ["make_evaluator", "seed_inputs", "seed_draws", "generate_seeds", "is_stochastic"]


def seed_draws(seeds: List[int], shape, label_dim: int, device: torch.device):
    """(rnd, latents, labels): `seed_inputs` plus the per-seed generator, positioned for the sampler's noise."""
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *shape], device=device)
    labels = None
    if label_dim:
        labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[len(seeds)], device=device)]
    return rnd, latents, labels


def seed_inputs(seeds: List[int], shape, label_dim: int, device: torch.device):
    """EDM's per-seed inputs: unit-normal latents [N, C, H, W] (float32) and one-hot labels [N, label_dim] or None.

    Draw order as generate.py: latents first, then the label `randint`, each from the seed's own generator.
    """
    return seed_draws(seeds, shape, label_dim, device)[1:]


def is_stochastic(generator) -> bool:
    """True for generators whose `generate` draws noise (`stochastic = True`, e.g. moment matching's students)."""
    return getattr(generator, "stochastic", False) is True


def generate_seeds(generator, seeds: List[int], shape, device):
    """(images [N,C,H,W] in [-1, 1], labels [N,label_dim] or None) for one batch of seeds, per-seed throughout.

    A stochastic generator gets `randn_like=rnd.randn_like` of the seeds' generators (after latents and labels).
    """
    rnd, latents, labels = seed_draws(seeds, shape, generator.label_dim, device)
    if is_stochastic(generator):
        return generator.generate(latents, labels, randn_like=rnd.randn_like), labels
    return generator.generate(latents, labels), labels


def _world(distributed: Optional[bool]):
    import torch.distributed as dist
    on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed is None:
        distributed = on
    return (dist.get_rank(), dist.get_world_size()) if distributed and on else (0, 1)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Student images [-1, 1] -> uint8 [N, C, H, W] with EDM's truncating `x·127.5 + 128` conversion."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


class _Evaluator:
    """Callable `evaluate(generator_module) -> {'metrics': {...}, 'primary': str, 'mode': 'min'|'max'}`."""

    def __init__(self, teacher, num, fid_ref, detector, batch, seed0, device, distributed, splits):
        if num < 2:
            raise ConfigError(f"--eval-num must be at least 2, got {num}.")
        self.teacher, self.batch, self.device, self.splits = teacher, batch, device, splits
        self.seeds = list(range(seed0, seed0 + num))
        self.distributed = distributed
        self.exact = fid_ref is None
        if self.exact:
            from pid.teachers import data_distribution
            self.mixture = data_distribution(teacher)   # scores; the ODE endpoints are the teacher's own
            if self.mixture is None:
                raise ConfigError("Evaluation during training needs --fid-ref (reference statistics from `fid.py "
                                  "ref`) unless the teacher is a built-in one (builtin:<name>).")
            self.references: Optional[List[torch.Tensor]] = None  # per local batch, computed on first use
        else:
            self.ref_mu, self.ref_sigma = load_stats(fid_ref)
            self.detector = load_detector(detector, device)

    def _batches(self, rank, world) -> List[List[int]]:
        """This rank's seed batches: EDM's split of the seed list (same as fid.py and generate.py)."""
        return [[self.seeds[i] for i in idx] for idx in rank_batches(len(self.seeds), self.batch, rank, world)]

    def __call__(self, generator) -> Dict:
        device = torch.device(self.device) if self.device is not None else \
            next(iter(generator.parameters()), torch.zeros(())).device
        shape = [generator.img_channels, generator.img_resolution, generator.img_resolution]
        rank, world = _world(self.distributed)
        was_training = getattr(generator, "training", False)
        if hasattr(generator, "eval"):
            generator.eval()
        try:
            with torch.no_grad():
                if self.exact and is_stochastic(generator):
                    metrics = self._distribution(generator, shape, device, rank, world)
                    return dict(metrics=metrics, primary="fd_exact", mode="min")
                if self.exact:
                    metrics = self._exact(generator, shape, device, rank, world)
                    return dict(metrics=metrics, primary="rmse", mode="min")
                return dict(metrics=self._fid(generator, shape, device, rank, world), primary="fid", mode="min")
        finally:
            if was_training:
                generator.train()

    def _fid(self, generator, shape, device, rank, world) -> Dict[str, float]:
        acc, probs, order = StatsAccumulator(self.detector.device), [], []
        for seeds in self._batches(rank, world):
            images = _to_uint8(generate_seeds(generator, seeds, shape, device)[0])
            acc.update(self.detector.features(images))
            if self.detector.has_probs:
                probs.append(self.detector.probs(images).cpu().numpy())
                order.extend(s - self.seeds[0] for s in seeds)
        if world > 1:
            acc.all_reduce(self.ref_mu.shape[0])
        mu, sigma = acc.mu_sigma()
        metrics = {"fid": frechet_distance(mu, sigma, self.ref_mu, self.ref_sigma)}
        if self.detector.has_probs:
            all_probs = gather_rows(probs, order, len(self.seeds)) if world > 1 else np.concatenate(probs)
            if len(all_probs) >= self.splits:
                metrics["is"], metrics["is_std"] = inception_score(all_probs, self.splits)
        return metrics

    def _exact(self, generator, shape, device, rank, world) -> Dict[str, float]:
        from pid.exact_eval import exact_metrics, reference_endpoints
        inputs = [seed_inputs(s, shape, generator.label_dim, device) for s in self._batches(rank, world)]
        if self.references is None:  # the teacher's ODE endpoints of these fixed seeds never change
            self.references = [reference_endpoints(self.teacher, z, c) for z, c in inputs]
        images = torch.cat([generator.generate(z, c).to(torch.float64) for z, c in inputs])
        labels = None if inputs[0][1] is None else torch.cat([c for _z, c in inputs])
        metrics = exact_metrics(self.mixture, images, torch.cat(self.references).to(images.device), labels)
        if world > 1:  # every value is a mean over images: weight by the local count and sum
            import torch.distributed as dist
            keys = sorted(metrics)
            t = torch.tensor([metrics[k] * len(images) for k in keys] + [len(images)], dtype=torch.float64,
                             device=device)
            dist.all_reduce(t)
            metrics = {k: float(v / t[-1]) for k, v in zip(keys, t[:-1])}
        return {k: float(v) for k, v in metrics.items()}


    def _distribution(self, generator, shape, device, rank, world) -> Dict[str, float]:
        """Set metrics of a stochastic generator; every rank scores all images (gathered in seed order)."""
        from pid.exact_eval import distribution_metrics
        rows, order = [], []
        for seeds in self._batches(rank, world):
            images, labels = generate_seeds(generator, seeds, shape, device)
            parts = [images.reshape(len(seeds), -1)] + ([] if labels is None else [labels])
            rows.append(torch.cat([p.to(torch.float64) for p in parts], dim=1).cpu().numpy())
            order.extend(s - self.seeds[0] for s in seeds)
        table = torch.from_numpy(gather_rows(rows, order, len(self.seeds)) if world > 1 else np.concatenate(rows))
        dim = int(np.prod(shape))
        images = table[:, :dim].reshape(-1, *shape)
        labels = table[:, dim:] if generator.label_dim else None
        return distribution_metrics(self.mixture, images, labels)


def make_evaluator(teacher, *, num: int, fid_ref: Optional[str], detector: Optional[str] = None, batch: int = 64,
                   seed0: int = 0, device=None, distributed: Optional[bool] = None,
                   splits: int = 10) -> Callable[[torch.nn.Module], Dict]:
    """An `evaluate(generator_module) -> dict` for the trainer, on fixed seeds `seed0 .. seed0+num-1`.

    `generator_module.generate(latents [N,C,H,W] unit normal, class_labels [N,label_dim] one-hot or None)` must
    return images in [-1, 1]; it must expose `label_dim`, `img_channels`, `img_resolution`. Latents and labels
    are EDM's per-seed draws, so a seed's image does not depend on `batch`.

    Returns `{'metrics': {...}, 'primary': KEY, 'mode': 'min'}`: the trainer keeps the checkpoint with the
    lowest `metrics[primary]` (mode 'min': lower is better).
    * `fid_ref` given: metrics `fid` (primary) plus `is`, `is_std` (Inception Score, `splits` splits) when the
      detector is the Inception network and num >= splits. `detector` as in `fid.py --detector`.
    * `fid_ref` None and a built-in teacher (an analytic one, or a network one with `.data_distribution`): metrics
      `rmse` (primary), `component_accuracy`, `log_likelihood`, `data_log_likelihood` from `pid.exact_eval`,
      scored under the mixture; the reference endpoints are the teacher's own ODE endpoints
      (`pid.exact_eval.reference_endpoints`), computed on the first call and cached. For a stochastic generator (`stochastic = True`,
      called as `generate(latents, labels, randn_like=...)` with the seeds' own noise): `fd_exact` (primary),
      `component_tv`, `rms_to_mean` and their `data_*` floors from `pid.exact_eval.distribution_metrics`.
    * otherwise: ConfigError (an EDM teacher needs `--fid-ref`).
    Files (statistics, detector) are loaded here, once, so a bad path fails before training starts.
    Distributed (torch.distributed initialised, `distributed` None or True): seeds are split across ranks, the
    call is collective (call it on every rank) and every rank gets the same result. Pass `distributed=False`
    to evaluate on one rank only.
    """
    return _Evaluator(teacher, num, fid_ref, detector, batch, seed0, device, distributed, splits)
