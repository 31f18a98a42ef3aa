"""Fréchet Inception Distance and Inception Score with EDM's protocol (`fid.py ref` / `fid.py calc`).

    python fid.py ref  --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=out/ --ref=fid-refs/cifar10-32x32.npz [--num=50000 --seed=0] [--is]
    python fid.py is   --images=out/ [--num=50000]
    torchrun --standalone --nproc_per_node=8 fid.py calc ...

`calc` prints the FID as EDM does (`{:g}`, one line on stdout); progress and messages go to stderr.
"""

import os
from typing import Optional

import click
import torch

from pid.cli import OneLineGroup, check_output_file, user_errors
from pid.errors import DataError
from pid.metrics.features import compute_statistics
from pid.metrics.images import ImageSet
from pid.metrics.inception import INCEPTION_URL, load_detector
from pid.metrics.stats import frechet_distance, inception_score, load_stats, save_stats


def _setup(device: Optional[str]):
    """Initialise torch.distributed under torchrun (NCCL on CUDA, gloo on CPU); return (device, rank)."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    dev = torch.device(f"cuda:{local_rank}" if cuda and world > 1 else (device or ("cuda" if cuda else "cpu")))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.multiprocessing.set_start_method("spawn", force=True)  # CUDA in DataLoader workers needs spawn
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dev, (dist.get_rank() if dist.is_initialized() else 0)


def _say(rank: int, message: str) -> None:
    if rank == 0:
        click.echo(message, err=True)


def _stats(images: str, num, seed, batch, workers, detector, rank, with_probs=False, expect_dim=None,
           with_features=True) -> dict:
    _say(rank, f'Loading images from "{images}"...')
    dataset = ImageSet(images, num=num, seed=seed)
    _say(rank, f"Calculating statistics for {len(dataset)} images...")
    return compute_statistics(detector, dataset, batch=batch, workers=workers, with_probs=with_probs,
                              with_features=with_features, expect_dim=expect_dim)


def _common(fn):
    """Options shared by every subcommand."""
    for option in reversed([
        click.option("--batch", help="Maximum batch size per process", metavar="INT", type=click.IntRange(min=1),
                     default=64, show_default=True),
        click.option("--detector", help="Feature network: TorchScript path or URL [default: Inception 2015-12-05]",
                     metavar="PATH|URL", type=str, default=None),
        click.option("--workers", help="DataLoader worker processes per process", metavar="INT",
                     type=click.IntRange(min=0), default=3, show_default=True),
        click.option("--device", help="Device, e.g. cuda, cuda:1, cpu [default: cuda if available]", type=str,
                     default=None),
    ]):
        fn = option(fn)
    return fn


@click.group(cls=OneLineGroup)
def main():
    """Compute FID and Inception Score exactly as EDM does (same detector input, statistics and formula)."""


@main.command()
@click.option("--data", "data", help="Dataset folder (recursive) or EDM dataset zip", metavar="PATH|ZIP",
              type=str, required=True)
@click.option("--dest", "dest", help="Where to write the reference statistics", metavar="NPZ", type=str,
              required=True)
@_common
@user_errors
def ref(data, dest, batch, detector, workers, device):
    """Compute reference statistics (mu, sigma) of a dataset and save them as .npz."""
    # Fail before hours of feature extraction, not after (save_stats appends .npz like np.savez).
    check_output_file(dest if dest.endswith(".npz") else dest + ".npz", "--dest", (".npz",))
    dev, rank = _setup(device)
    _say(rank, f"Loading detector {detector or INCEPTION_URL}...")
    det = load_detector(detector, dev)
    stats = _stats(data, None, 0, batch, workers, det, rank)
    if rank == 0:
        path = save_stats(dest, stats["mu"], stats["sigma"])
        _say(rank, f'Saving dataset reference statistics to "{path}"...')
    _say(rank, "Done.")


@main.command()
@click.option("--images", "images", help="Generated images: folder (recursive) or zip", metavar="PATH|ZIP",
              type=str, required=True)
@click.option("--ref", "ref_path", help="Reference statistics (.npz with mu, sigma)", metavar="NPZ|URL", type=str,
              required=True)
@click.option("--num", help="Number of images to use", metavar="INT", type=click.IntRange(min=2), default=50000,
              show_default=True)
@click.option("--seed", help="Random seed for selecting the images", metavar="INT", type=int, default=0,
              show_default=True)
@click.option("--is", "with_is", help="Also compute the Inception Score (printed on a second line)", is_flag=True)
@click.option("--splits", help="Inception Score splits", metavar="INT", type=click.IntRange(min=1), default=10,
              show_default=True)
@_common
@user_errors
def calc(images, ref_path, num, seed, with_is, splits, batch, detector, workers, device):
    """Calculate FID of a set of images against reference statistics; print it like EDM."""
    dev, rank = _setup(device)
    _say(rank, f'Loading dataset reference statistics from "{ref_path}"...')
    ref_mu, ref_sigma = load_stats(ref_path)
    _say(rank, f"Loading detector {detector or INCEPTION_URL}...")
    det = load_detector(detector, dev)
    if with_is:
        det.require_probs()  # fail before the pass, not after it
    stats = _stats(images, num, seed, batch, workers, det, rank, with_probs=with_is, expect_dim=ref_mu.shape[0])
    if rank == 0:
        _say(rank, "Calculating FID...")
        fid = frechet_distance(stats['mu'], stats['sigma'], ref_mu, ref_sigma)
        scale = float(stats["sigma"].trace() + ref_sigma.trace()) + 1.0   # round-off allowance for a zero FID
        _check_fid(fid, int(stats["n"]), int(ref_mu.shape[0]), -1e-6 * scale, rank)
        click.echo(f"{fid:g}")
        if with_is:
            mean, std = inception_score(stats["probs"], splits)
            click.echo(f"IS {mean:g} +- {std:g}")


def _check_fid(fid: float, n: int, dim: int, lowest: float, rank: int) -> None:
    """Say when the FID is not meaningful: too few images for a full-rank covariance, or a value below
    `lowest` (a small negative round-off allowance)."""
    if n > dim and fid >= lowest:
        return
    why = (f"{n} images give a singular {dim}x{dim} covariance (at least {dim + 1} are needed; EDM's protocol "
           f"uses 50000, --num)") if n <= dim else "the statistics are numerically degenerate"
    if fid < lowest:
        raise DataError(f"FID came out negative ({fid:g}), which is impossible: {why}. Use more images.")
    _say(rank, f"Warning: this FID is not comparable to published values: {why}.")


@main.command(name="is")
@click.option("--images", "images", help="Images: folder (recursive) or zip", metavar="PATH|ZIP", type=str,
              required=True)
@click.option("--num", help="Number of images to use [default: all]", metavar="INT", type=click.IntRange(min=2),
              default=None)
@click.option("--seed", help="Random seed for selecting the images", metavar="INT", type=int, default=0,
              show_default=True)
@click.option("--splits", help="Number of splits", metavar="INT", type=click.IntRange(min=1), default=10,
              show_default=True)
@_common
@user_errors
def is_(images, num, seed, splits, batch, detector, workers, device):
    """Calculate the Inception Score (mean and std over splits); print `mean std`."""
    dev, rank = _setup(device)
    _say(rank, f"Loading detector {detector or INCEPTION_URL}...")
    det = load_detector(detector, dev)
    det.require_probs()
    stats = _stats(images, num, seed, batch, workers, det, rank, with_probs=True, with_features=False)
    if rank == 0:
        mean, std = inception_score(stats["probs"], splits)
        click.echo(f"{mean:g} {std:g}")


if __name__ == "__main__":
    main()
