"""Images on disk exactly as EDM's generate.py writes them, plus grids and npz archives.

Float images are NCHW in [-1, 1]; uint8 images are NHWC. The conversion truncates `x*127.5 + 128`
(clipped to [0, 255]) like EDM, so the same float output gives byte-identical PNGs.
"""

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["to_uint8", "image_path", "save_pngs", "save_grid", "save_npz", "make_grid"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[N,C,H,W] float in [-1,1] -> [N,H,W,C] uint8 on the CPU, EDM's truncating conversion."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_path(outdir: str, seed: int, subdirs: bool = False) -> str:
    """`outdir/{seed:06d}.png`, or `outdir/{seed - seed % 1000:06d}/{seed:06d}.png` with subdirs."""
    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
    return os.path.join(folder, f"{seed:06d}.png")


def _pil_image(array: np.ndarray):
    from PIL import Image  # imported here so that `import pid` stays light
    if array.shape[2] == 1:
        return Image.fromarray(array[:, :, 0], "L")
    return Image.fromarray(array, "RGB")


def save_pngs(images_uint8: torch.Tensor, seeds: Sequence[int], outdir: str, subdirs: bool = False) -> None:
    """Write [N,H,W,C] uint8 images as one PNG per seed (1-channel 'L' or 'RGB', PIL defaults)."""
    for seed, array in zip(seeds, images_uint8.numpy()):
        path = image_path(outdir, int(seed), subdirs)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _pil_image(array).save(path)


def make_grid(images_uint8: np.ndarray, cols: Optional[int] = None) -> np.ndarray:
    """Tile [N,H,W,C] uint8 images row by row into one [rows*H, cols*W, C] array (black padding)."""
    n, h, w, c = images_uint8.shape
    cols = cols or max(int(math.ceil(math.sqrt(n))), 1)
    rows = max(int(math.ceil(n / cols)), 1)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images_uint8):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
    return grid


def save_grid(images_uint8: np.ndarray, path: str, cols: Optional[int] = None) -> None:
    """Write [N,H,W,C] uint8 images as one PNG grid (about square unless `cols` is given)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    _pil_image(make_grid(np.asarray(images_uint8), cols)).save(path)


def save_npz(path: str, images_uint8: np.ndarray, labels: Optional[np.ndarray], seeds: Sequence[int]) -> None:
    """Write `images` [N,H,W,C] uint8, `labels` [N] int64 class indices (-1 when unconditional), `seeds` [N]."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    n = len(images_uint8)
    labels = np.full([n], -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    np.savez(path, images=np.asarray(images_uint8, dtype=np.uint8), labels=labels,
             seeds=np.asarray(list(seeds), dtype=np.int64))
