"""Evaluation metrics: the Inception detector, FID statistics, Fréchet distance, Inception Score, training evals.

`make_evaluator` lives in `pid.metrics.evaluate` (imported on use: it pulls in the samplers and teachers).
"""

from pid.metrics.features import compute_statistics, rank_batches
from pid.metrics.images import ImageSet, list_image_files, select_subset
from pid.metrics.inception import EDM_INCEPTION_PKL_URL, INCEPTION_URL, Detector, load_detector
from pid.metrics.stats import (StatsAccumulator, frechet_distance, inception_score, inception_score_from_logits,
                               load_stats, save_stats)

__all__ = ["compute_statistics", "rank_batches", "ImageSet", "list_image_files", "select_subset",
           "EDM_INCEPTION_PKL_URL", "INCEPTION_URL", "Detector", "load_detector", "StatsAccumulator",
           "frechet_distance", "inception_score", "inception_score_from_logits", "load_stats", "save_stats"]
