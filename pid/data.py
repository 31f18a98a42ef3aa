"""Training data for moment matching: real images x to forward-diffuse, in a fixed order that resumes exactly.

Two sources share one `sample(start, count, generator, device)` call:
  * `DatasetSource` reads an EDM dataset zip (the format of EDM's dataset_tool.py) or an image folder, lazily
    by index, in the order of `EpochSampler`: global sample position p is a pure function of (seed, p), so N
    processes that each take their slice of a step's positions see the same images as 1 process with gradient
    accumulation, and a resumed run continues where it stopped without saving any data-loader state.
  * `MixtureSource` draws exact samples of a built-in Gaussian mixture teacher; no files needed.
"""

import hashlib
import json
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from pid.errors import ConfigError, DataError
from pid.metrics.images import ImageSet, list_image_files
from pid.toy import GaussianMixtureTeacher

__all__ = ["ImageDataset", "open_dataset", "check_against_teacher", "EpochSampler", "DatasetSource",
           "MixtureSource", "make_data_source"]

LABELS_FILE = "dataset.json"  # EDM's dataset_tool.py: {"labels": [["00000/img00000000.png", 6], ...]} or null


class ImageDataset(ImageSet):
    """The images of an EDM dataset zip or an image folder, with their class labels, decoded on access.

    Image files are every file PIL knows the extension of, at any depth, sorted by '/'-separated relative
    path (EDM's order). `labels` is an int64 array [N] of class indices from `dataset.json` in the root,
    or None when that file is absent or its labels are null. Only the first image is decoded at open.
    """

    def __init__(self, path: str):
        files = list_image_files(path)
        if not files:
            raise DataError(f"Found no images in '{path}': give an EDM dataset zip (dataset_tool.py) or a folder "
                            f"of .png/.jpg images (a file counts as an image when PIL knows its extension).")
        self._open(path, files)
        self.labels = self._read_labels()

    @property
    def resolution(self) -> int:
        """Image height in pixels (EDM datasets are square; `shape` has both sides)."""
        return int(self.shape[1])

    @property
    def channels(self) -> int:
        """1 for grayscale images, 3 otherwise."""
        return int(self.shape[0])

    def image(self, i: int) -> torch.Tensor:
        """Image i as float32 [C,H,W] in [-1, 1] (x / 127.5 − 1 of the uint8 pixels)."""
        return self[i].to(torch.float32) / 127.5 - 1

    def images(self, indices: torch.Tensor) -> torch.Tensor:
        """Images at `indices` [B] as float32 [B,C,H,W] in [-1, 1]."""
        return torch.stack([self.image(int(i)) for i in indices])

    def _read_labels(self) -> Optional[np.ndarray]:
        """Class index of each image, int64 [N], from dataset.json; None without labels."""
        try:
            data = self._read_bytes(LABELS_FILE)
        except (KeyError, FileNotFoundError):  # what ZipFile.read and open() raise for a missing file
            return None
        try:
            labels = json.loads(data)["labels"]
            table = dict(labels) if labels is not None else None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"Cannot read '{LABELS_FILE}' in '{self.path}' ({type(exc).__name__}: {exc}): it must "
                            f"be {{\"labels\": [[\"file.png\", class], ...]}} or {{\"labels\": null}}, as EDM's "
                            f"dataset_tool.py writes it.") from None
        return None if table is None else self._labels_in_order(table)

    def _labels_in_order(self, table: dict) -> np.ndarray:
        missing = [f for f in self.files if f not in table]
        if missing:
            raise DataError(f"'{LABELS_FILE}' in '{self.path}' has no label for '{missing[0]}' ({len(missing)} of "
                            f"{len(self.files)} images unlabelled): label every image or set \"labels\": null.")
        values = [table[f] for f in self.files]
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int)), None)
        if bad is not None:
            raise DataError(f"'{LABELS_FILE}' in '{self.path}' has label {bad!r}, but training needs one integer "
                            f"class index per image: rewrite the labels as class indices.")
        return np.asarray(values, dtype=np.int64)


def open_dataset(path: str) -> ImageDataset:
    """Open an EDM dataset zip or image folder; DataError (one line with the path and fix) when unusable."""
    return ImageDataset(os.fspath(path))


def _check_labels(dataset: ImageDataset, label_dim: int) -> None:
    """Raise DataError unless a class-conditional teacher (label_dim > 0) gets labels in [0, label_dim)."""
    if label_dim <= 0:
        return  # an unconditional teacher ignores the dataset's labels
    if dataset.labels is None:
        raise DataError(f"Dataset '{dataset.path}' has no labels, but the teacher is class-conditional with "
                        f"{label_dim} classes: add '{LABELS_FILE}' with one class per image "
                        f"(EDM's dataset_tool.py writes it from class folders).")
    low, high = int(dataset.labels.min()), int(dataset.labels.max())
    if low < 0 or high >= label_dim:
        raise DataError(f"Dataset '{dataset.path}' has class labels in [{low}, {high}], but the teacher has "
                        f"{label_dim} classes, so labels must lie in [0, {label_dim - 1}]: use the dataset the "
                        f"teacher was trained on.")


def check_against_teacher(dataset: ImageDataset, resolution: int, channels: int, label_dim: int) -> None:
    """Raise DataError (one line: path, found, expected, fix) when the images or labels do not fit the teacher."""
    c, h, w = dataset.shape
    if (h, w) != (resolution, resolution):
        raise DataError(f"Dataset '{dataset.path}' has {w}x{h} images, but the teacher generates "
                        f"{resolution}x{resolution}: make the dataset at the teacher's resolution "
                        f"(EDM's dataset_tool.py --resolution={resolution}x{resolution}).")
    if c != channels:
        raise DataError(f"Dataset '{dataset.path}' has {c}-channel images, but the teacher generates {channels}-"
                        f"channel ones: convert the images to {'RGB' if channels == 3 else 'grayscale'}.")
    _check_labels(dataset, label_dim)


def _epoch_seed(seed: int, epoch: int) -> int:
    """63-bit seed of epoch `epoch`: stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256(f"pid-data/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class EpochSampler:
    """Dataset index at each global sample position: position p is perm_e[p % n] with e = p // n.

    perm_e is `torch.randperm(n)` seeded by (seed, e) alone, so any slice of positions can be computed by any
    process at any time; this is what makes data order part of exact resume without saved state.
    """

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError(f"EpochSampler needs at least one item, got n={n}")
        self.n, self.seed = int(n), int(seed)
        self._cached: Tuple[int, Optional[torch.Tensor]] = (-1, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        """perm_e, int64 [n]; the last one is cached since consecutive calls stay in one epoch."""
        if self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._cached = (epoch, torch.randperm(self.n, generator=gen))
        return self._cached[1]

    def indices(self, start: int, count: int) -> torch.LongTensor:
        """Dataset indices at positions start .. start+count−1, int64 [count]; may span epoch boundaries."""
        if start < 0 or count < 0:
            raise ValueError(f"positions must be non-negative, got start={start}, count={count}")
        parts: List[torch.Tensor] = []
        p, end = int(start), int(start) + int(count)
        while p < end:
            epoch, offset = divmod(p, self.n)
            take = min(self.n - offset, end - p)
            parts.append(self.permutation(epoch)[offset:offset + take])
            p += take
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


class DatasetSource:
    """Real images in EpochSampler order, with one-hot labels for a class-conditional teacher."""

    def __init__(self, dataset: ImageDataset, label_dim: int, seed: int):
        _check_labels(dataset, label_dim)
        self.dataset, self.label_dim = dataset, int(label_dim)
        self.sampler = EpochSampler(len(dataset), seed)

    def sample(self, positions_start: int, count: int, generator: Optional[torch.Generator] = None,
               device=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x float32 [B,C,H,W] in [-1,1] and one-hot labels float32 [B,label_dim] (None if unconditional).

        The positions alone choose the images; `generator` is unused (same signature as MixtureSource).
        """
        idx = self.sampler.indices(positions_start, count)
        x = self.dataset.images(idx).to(device)
        if self.label_dim == 0:
            return x, None
        classes = torch.from_numpy(self.dataset.labels[idx.numpy()])
        return x, F.one_hot(classes, self.label_dim).to(device=device, dtype=torch.float32)


class MixtureSource:
    """Exact samples of a GaussianMixtureTeacher's data distribution, drawn from the caller's generator."""

    def __init__(self, teacher: GaussianMixtureTeacher):
        self.teacher = teacher
        self.label_dim = int(teacher.label_dim)

    def _components(self, count: int, generator: Optional[torch.Generator], device) -> torch.Tensor:
        """k ~ Categorical(π), int64 [count], by inverse CDF: torch.multinomial takes only CPU generators."""
        u = torch.rand(count, generator=generator, device=device, dtype=torch.float64)
        cdf = self.teacher.log_weights.to(device).exp().cumsum(0)
        return torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1)  # rounding: cdf[-1] may be < 1

    def sample(self, positions_start: int, count: int, generator: Optional[torch.Generator] = None,
               device=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x = μ_k + s·ε float32 [B,C,H,W] and one-hot(class of k) float32 [B,label_dim] (None if label_dim=0).

        Draws on the generator's device, so a CUDA generator works; `positions_start` is unused.
        """
        draw_device = generator.device if generator is not None else torch.device("cpu")
        k = self._components(count, generator, draw_device)
        means = self.teacher.means.to(draw_device)
        noise = torch.randn([count, *means.shape[1:]], generator=generator, device=draw_device, dtype=torch.float64)
        x = (means[k] + self.teacher.std * noise).to(device=device, dtype=torch.float32)
        if self.label_dim == 0:
            return x, None
        classes = self.teacher.component_labels.to(draw_device)[k]
        return x, F.one_hot(classes, self.label_dim).to(device=device, dtype=torch.float32)


def make_data_source(spec: Optional[str], teacher, seed: int):
    """The data source for `--data=spec`: a checked DatasetSource for a path, else the mixture's own samples.

    teacher: any teacher with img_resolution, img_channels, label_dim. Without a spec only a teacher with a known
    data distribution works (a GaussianMixtureTeacher, or a built-in network teacher's `.data_distribution`, the
    mixture it was trained on), since an EDM network of unknown data has no distribution to sample from.
    """
    if spec is None:
        from pid.teachers import data_distribution
        mixture = data_distribution(teacher)
        if isinstance(mixture, GaussianMixtureTeacher):
            return MixtureSource(mixture)
        raise ConfigError("moment matching needs training data: pass --data=dataset.zip (EDM dataset_tool "
                          "format) or an image folder")
    dataset = open_dataset(spec)
    check_against_teacher(dataset, int(teacher.img_resolution), int(teacher.img_channels), int(teacher.label_dim))
    return DatasetSource(dataset, int(teacher.label_dim), seed)
