"""Image sets for FID: folders (searched recursively) and EDM dataset zips, read as uint8 CHW like EDM's reader.

A file is an image when PIL knows its extension; files are ordered by their relative path. When a set has more
images than asked for, EDM's seeded subset is used, so `fid.py calc --num --seed` picks the same images as EDM.
"""

import io
import os
import zipfile
import zlib
from typing import List, Optional

import numpy as np
import torch

from pid.errors import DataError

__all__ = ["ImageSet", "list_image_files", "select_subset"]


def _image_extensions() -> set:
    from PIL import Image  # imported here so that `import pid` stays light
    Image.init()
    return set(Image.EXTENSION)


def list_image_files(path: str) -> List[str]:
    """Sorted relative paths ('/'-separated) of every image in a folder (recursive) or in a zip's members."""
    if not os.path.exists(path):
        raise DataError(f"Image path '{path}' does not exist: give a folder of images or a dataset .zip.")
    if os.path.isdir(path):
        names = [os.path.relpath(os.path.join(root, f), start=path).replace(os.sep, "/")
                 for root, _dirs, files in os.walk(path) for f in files]
    else:
        names = _zip_members(path)
    extensions = _image_extensions()
    return sorted(n for n in names if os.path.splitext(n)[1].lower() in extensions)


def _zip_members(path: str) -> List[str]:
    """Member names of zip `path`; DataError when it is not a zip or a damaged one."""
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except zipfile.BadZipFile as exc:
        with open(path, "rb") as f:
            damaged = f.read(4) == b"PK\x03\x04"  # a zip's first local header: likely a truncated download
        if damaged:
            raise DataError(f"'{path}' is a damaged zip archive ({exc}): recreate it (EDM's dataset_tool.py) "
                            f"or download it again.") from None
        raise DataError(f"'{path}' is neither a folder nor a zip archive: give a folder of images or a "
                        f"dataset .zip.") from None


def select_subset(n: int, num: int, seed: int) -> np.ndarray:
    """Indices of EDM's subset: shuffle `arange(n)` with `RandomState(seed % 2**31)`, keep `num`, sort."""
    idx = np.arange(n)
    if n > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx


class ImageSet(torch.utils.data.Dataset):
    """The images of a folder or zip as uint8 tensors [C, H, W] (C = 1 for grayscale, 3 otherwise).

    num: when given, the set must hold at least `num` images and EDM's seeded subset of `num` is used.
    Modes other than 'L' and 'RGB' (palette, RGBA, 16-bit) are converted to RGB.
    """

    def __init__(self, path: str, num: Optional[int] = None, seed: int = 0):
        files = list_image_files(path)
        if num is not None and len(files) < num:
            raise DataError(f"Found {len(files)} images in '{path}', but --num asks for {num}: generate more "
                            f"images or lower --num.")
        files = [files[i] for i in select_subset(len(files), num if num is not None else len(files), seed)]
        if len(files) < 2:
            raise DataError(f"Found {len(files)} images in '{path}' (after --num), but statistics need at "
                            f"least 2; a file counts as an image when PIL knows its extension (.png, .jpg, ...).")
        self._open(path, files)

    def _open(self, path: str, files: List[str]) -> None:
        """Use `files` (relative names) of folder or zip `path`; decodes the first image only, for its shape."""
        self.path, self.files = path, files
        self._zip, self._zip_pid = None, None
        self.shape = tuple(self._load(0).shape)

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self):  # an open ZipFile cannot be sent to DataLoader workers; each reopens its own
        return dict(self.__dict__, _zip=None)

    def _read_bytes(self, name: str) -> bytes:
        if os.path.isdir(self.path):
            with open(os.path.join(self.path, name), "rb") as f:
                return f.read()
        # one ZipFile per process: forked DataLoader workers would otherwise share the file offset
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip, self._zip_pid = zipfile.ZipFile(self.path), os.getpid()
        return self._zip.read(name)

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image
        name = self.files[i]
        try:
            data = self._read_bytes(name)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # a damaged member (bad CRC, bad deflate data)
            raise DataError(f"Image '{name}' in '{self.path}' is damaged inside the zip ({exc}): recreate the "
                            f"archive (EDM's dataset_tool.py) or download it again.") from None
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.mode not in ("L", "RGB"):
                    img = img.convert("RGB")
                array = np.array(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # PIL's errors for broken files include these
            raise DataError(f"Cannot read image '{name}' in '{self.path}': not a valid image file "
                            f"({type(exc).__name__}). Remove or replace it.") from None
        array = array[:, :, None] if array.ndim == 2 else array
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def __getitem__(self, i: int) -> torch.Tensor:
        image = self._load(i)
        if tuple(image.shape) != self.shape:
            raise DataError(f"Image '{self.files[i]}' in '{self.path}' has shape {list(image.shape)} but "
                            f"'{self.files[0]}' has {list(self.shape)}: all images must have the same size.")
        return image
