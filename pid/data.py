"""Training data for moment matching: real images x to forward-diffuse, in a fixed order that resumes exactly.

Two sources share one `sample(start, count, generator, device)` call:
  * `DatasetSource` reads an EDM dataset zip (the format of EDM's dataset_tool.py) or an image folder, lazily
    by index, in the order of `EpochSampler`: global sample position p is a pure function of (seed, p), so N
    processes that each take their slice of a step's positions see the same images as 1 process with gradient
    accumulation, and a resumed run continues where it stopped without saving any data-loader state.
  * `MixtureSource` draws exact samples of a built-in Gaussian mixture teacher; no files needed.
  * `TeacherDataSource` (`--data=teacher`) is a DatasetSource over samples of the teacher itself, generated
    once into an EDM dataset zip beside the run directories (split across processes, resumable, shared by the
    runs of one teacher; docs/moment_matching.md).
"""

import hashlib
import io
import json
import os
import shutil
import time
import zipfile
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from pid.errors import ConfigError, DataError
from pid.metrics.images import ImageSet, list_image_files
from pid.toy import GaussianMixtureTeacher

__all__ = ["ImageDataset", "open_dataset", "check_against_teacher", "EpochSampler", "DatasetSource",
           "MixtureSource", "TEACHER_DATA", "TeacherDataSource", "write_dataset_zip", "make_data_source"]

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


def write_dataset_zip(path: str, images: np.ndarray, labels: Optional[np.ndarray]) -> None:
    """An EDM dataset zip (dataset_tool.py's layout: `00000/img00000000.png`, `dataset.json`) of uint8 images
    [N,H,W,C] and class indices [N] (or None), written atomically (a temporary file, then a rename)."""
    from pid.images import _pil_image
    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    tmp = f"{path}.tmp{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for name, image in zip(names, images):
            buf = io.BytesIO()
            _pil_image(image).save(buf, format="png", compress_level=0)
            z.writestr(name, buf.getvalue())
        table = None if labels is None else [[n, int(c)] for n, c in zip(names, labels)]
        z.writestr(LABELS_FILE, json.dumps({"labels": table}))
    os.replace(tmp, path)


TEACHER_DATA = "teacher"            # --data=teacher: moment matching on the teacher's own samples
TEACHER_DATA_FILE = "teacher-data.zip"
TEACHER_DATA_SEED0 = 3_000_000_000  # latents of the cache: EDM per-seed draws, away from every evaluation's seeds
_CHUNK = 256                        # seeds per generated part (fixed: the parts do not depend on the process count)


def _teacher_identity(spec: Optional[str]) -> dict:
    """What names the teacher in a cache key: its spec, and for a local file its size and modification time."""
    ident = {"teacher": spec}
    if spec and os.path.isfile(spec):
        st = os.stat(spec)
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return ident


class TeacherDataSource:
    """Moment matching without a dataset: x are the teacher's own Heun samples (`steps` steps, NFE 2·steps−1) of
    seeds TEACHER_DATA_SEED0 .. +num−1 (EDM's per-seed latents and class labels), written once into an EDM
    dataset zip by `prepare` and then read in EpochSampler order like any dataset.

    The zip lives beside the run directories, in `<outdir>/teacher-data/<key>/teacher-data.zip` with `key` a hash
    of the teacher and the settings, so that the runs of one teacher (training seeds, k, algorithms) share it and
    a run killed before its first snapshot finds the parts already made. `prepare` runs on every process before
    training: each generates its share of the 256-seed parts (part i on rank i mod world) into `parts/`, the
    main process packs them into the zip, and the run directory gets `teacher-data.json` naming the cache.
    """

    def __init__(self, teacher, num: int, steps: int, seed: int, teacher_spec: Optional[str] = None):
        if num < 1 or steps < 1:
            raise ConfigError(f"--data=teacher needs --teacher-data-num ≥ 1 and --teacher-data-steps ≥ 1, got "
                              f"{num} and {steps}")
        self.teacher, self.num, self.steps, self.seed = teacher, int(num), int(steps), int(seed)
        self.teacher_spec = teacher_spec
        self.label_dim = int(teacher.label_dim)
        self.source: Optional[DatasetSource] = None
        self.path: Optional[str] = None

    def manifest(self) -> dict:
        """What the cache holds; a zip whose manifest differs is another cache."""
        return {"kind": "pid teacher samples", "sampler": "heun", "steps": self.steps, "num": self.num,
                "seed0": TEACHER_DATA_SEED0, "shape": [int(self.teacher.img_channels),
                                                       int(self.teacher.img_resolution),
                                                       int(self.teacher.img_resolution)],
                "label_dim": self.label_dim, **_teacher_identity(self.teacher_spec)}

    def cache_dir(self, outdir: str) -> str:
        """`<outdir>/teacher-data/<16 hex digits of the manifest's hash>`."""
        key = hashlib.sha256(json.dumps(self.manifest(), sort_keys=True).encode()).hexdigest()[:16]
        return os.path.join(outdir, "teacher-data", key)

    def prepare(self, run_dir: str, dist=None, log=None) -> None:
        """Generate (or find) the teacher samples of this run; a collective call under torchrun."""
        from pid.training import distributed as D
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        device = dist.device if dist is not None else torch.device("cpu")   # where the trainer put the teacher
        cache = self.cache_dir(os.path.dirname(os.path.abspath(run_dir)))
        path, info_path = os.path.join(cache, TEACHER_DATA_FILE), os.path.join(cache, "info.json")
        if not self._have(path, info_path):
            self._generate(cache, path, info_path, rank, world, device, log)
        elif log is not None:
            log.info(f"--data=teacher: using the {self.num} teacher samples in {path}")
        D.barrier()
        self.path = path
        if rank == 0:
            with open(info_path) as f:
                info = json.load(f)
            tmp = os.path.join(run_dir, f"teacher-data.json.tmp{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump({**info, "path": path}, f, indent=2)
            os.replace(tmp, os.path.join(run_dir, "teacher-data.json"))
        self.source = DatasetSource(open_dataset(path), self.label_dim, self.seed)

    def _have(self, path: str, info_path: str) -> bool:
        try:
            with open(info_path) as f:
                info = json.load(f)
        except (OSError, ValueError):
            return False
        return os.path.isfile(path) and info.get("manifest") == self.manifest()

    def _part(self, parts_dir: str, index: int) -> str:
        return os.path.join(parts_dir, f"part-{index:06d}.npz")

    @torch.no_grad()
    def _generate(self, cache, path, info_path, rank, world, device, log) -> None:
        from tqdm import tqdm
        from pid.exact_eval import heun_endpoints
        from pid.images import to_uint8
        from pid.metrics.evaluate import seed_draws
        from pid.training import distributed as D
        parts_dir = os.path.join(cache, "parts")
        os.makedirs(parts_dir, exist_ok=True)
        shape = self.manifest()["shape"]
        count = (self.num + _CHUNK - 1) // _CHUNK
        mine = list(range(rank, count, world))
        todo = [i for i in mine if not os.path.isfile(self._part(parts_dir, i))]
        if log is not None:
            log.info(f"generating {self.num} teacher samples for --data=teacher (Heun, {self.steps} steps, NFE "
                     f"{2 * self.steps - 1}) into {path}" + (f"; {len(mine) - len(todo)} of {len(mine)} parts "
                                                              f"already done" if len(todo) < len(mine) else ""))
        t0 = time.perf_counter()
        bar = tqdm(total=len(todo) * world, desc="teacher samples", unit="part", disable=rank != 0,
                   dynamic_ncols=True, leave=False)
        for i in todo:
            seeds = list(range(TEACHER_DATA_SEED0 + i * _CHUNK, TEACHER_DATA_SEED0 + min(self.num, (i + 1) * _CHUNK)))
            _, latents, labels = seed_draws(seeds, shape, self.label_dim, device)
            x = heun_endpoints(self.teacher, latents, labels, self.steps, chunk=_CHUNK)
            classes = (labels.argmax(1).cpu().numpy() if labels is not None else np.zeros(0, np.int64))
            tmp = self._part(parts_dir, i) + f".tmp{os.getpid()}.npz"
            np.savez(tmp, images=to_uint8(x.float()).numpy(), labels=classes)
            os.replace(tmp, self._part(parts_dir, i))
            bar.update(world)
        bar.close()
        elapsed = time.perf_counter() - t0
        spent = D.gather_objects(elapsed)
        if rank == 0:
            images, labels = [], []
            for i in range(count):
                with np.load(self._part(parts_dir, i)) as part:
                    images.append(part["images"])
                    labels.append(part["labels"])
            write_dataset_zip(path, np.concatenate(images), np.concatenate(labels) if self.label_dim else None)
            info = {"manifest": self.manifest(), "generation_seconds": float(max(spent)), "processes": world,
                    "device": str(device)}
            tmp = f"{info_path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(info, f, indent=2)
            os.replace(tmp, info_path)
            shutil.rmtree(parts_dir, ignore_errors=True)
            if log is not None:
                log.info(f"teacher samples: {self.num} in {max(spent):.1f} s on {world} process(es) -> {path}")

    def sample(self, positions_start: int, count: int, generator: Optional[torch.Generator] = None,
               device=None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """As DatasetSource.sample, over the generated samples (after `prepare`)."""
        if self.source is None:
            raise RuntimeError("TeacherDataSource.sample before prepare(run_dir): the trainer prepares it")
        return self.source.sample(positions_start, count, generator, device)


def check_teacher_data_spec(spec: Optional[str], given_options: dict) -> None:
    """One-line errors for `--data` values that mix the data-free mode with a path, and for teacher-data
    options given without `--data=teacher`."""
    if spec == TEACHER_DATA:
        if os.path.exists(TEACHER_DATA):
            raise ConfigError(f"--data=teacher means the teacher's own samples, but './{TEACHER_DATA}' also exists "
                              f"here: pass --data=./{TEACHER_DATA} for that dataset, or run from another folder")
        return
    if spec is not None and (TEACHER_DATA in [p.strip() for p in spec.replace(";", ",").split(",")]
                             or spec.startswith((TEACHER_DATA + ":", TEACHER_DATA + "+"))):
        raise ConfigError(f"--data={spec} mixes the teacher's own samples with a dataset: give --data=teacher or "
                          f"--data=<dataset.zip | folder>, not both")
    extra = next((k for k, v in given_options.items() if v is not None), None)
    if extra is not None:
        raise ConfigError(f"--{extra.replace('_', '-')} applies to --data=teacher only" +
                          (f", not to --data={spec}: drop it" if spec else "; add --data=teacher or drop it"))


def make_data_source(spec: Optional[str], teacher, seed: int, teacher_data_num: int = 10_000,
                     teacher_data_steps: int = 18, teacher_spec: Optional[str] = None):
    """The data source for `--data=spec`: a checked DatasetSource for a path, `TeacherDataSource` for 'teacher'
    (prepared by the trainer), else the mixture's own samples.

    teacher: any teacher with img_resolution, img_channels, label_dim. Without a spec only a teacher with a known
    data distribution works (a GaussianMixtureTeacher, or a built-in network teacher's `.data_distribution`, the
    mixture it was trained on), since an EDM network of unknown data has no distribution to sample from.
    """
    if spec == TEACHER_DATA:
        return TeacherDataSource(teacher, teacher_data_num, teacher_data_steps, seed, teacher_spec)
    if spec is None:
        from pid.teachers import data_distribution
        mixture = data_distribution(teacher)
        if isinstance(mixture, GaussianMixtureTeacher):
            return MixtureSource(mixture)
        raise ConfigError("moment matching needs training data: pass --data=dataset.zip (EDM dataset_tool "
                          "format) or an image folder, or --data=teacher for the teacher's own samples")
    dataset = open_dataset(spec)
    check_against_teacher(dataset, int(teacher.img_resolution), int(teacher.img_channels), int(teacher.label_dim))
    return DatasetSource(dataset, int(teacher.label_dim), seed)
