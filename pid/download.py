"""Cached downloads of teachers and feature networks.

A URL is fetched once into the cache directory and read from there afterwards. Offline, the error names the
URL and the exact path where the file can be placed by hand. Processes that want the same URL at once (the
ranks of a torchrun job, which all load the teacher) take turns on a file lock beside the cache entry: the
first downloads, the others wait and then read its file; no collective is involved, so a failed download
raises in every process instead of leaving the others waiting.
"""

import contextlib

import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent processes may download twice (each atomically)
    fcntl = None

from pid.errors import DownloadError

__all__ = ["cache_dir", "cached_path", "is_url"]


def is_url(spec: str) -> bool:
    """True for http(s) URLs; everything else is treated as a local path."""
    return urllib.parse.urlparse(str(spec)).scheme in ("http", "https")


def cache_dir() -> str:
    """The download cache: `$PID_CACHE_DIR`, else `$XDG_CACHE_HOME/pid`, else `~/.cache/pid`."""
    if os.environ.get("PID_CACHE_DIR"):
        return os.environ["PID_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pid")


def cache_path_for(url: str) -> str:
    """Where `url` is (or will be) cached: `<cache>/downloads/<hash>_<basename>`."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir(), "downloads", f"{digest}_{name}")


def cached_path(url: str, *, progress: bool = True, timeout: float = 30.0) -> str:
    """Return a local path holding the content of `url`, downloading it once if it is not cached yet.

    The download goes to a temporary file that is renamed into place only when complete, so an interrupted
    download never leaves a truncated file in the cache.
    """
    dest = cache_path_for(url)
    if os.path.isfile(dest):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    with download_lock(dest):
        if not os.path.isfile(dest):   # another process may have fetched it while we waited
            _download(url, dest, progress, timeout)
    return dest


@contextlib.contextmanager
def download_lock(dest: str):
    """Hold an exclusive lock on `dest + '.lock'` (the processes of one job fetch a file one at a time)."""
    try:
        f = open(dest + ".lock", "a") if fcntl is not None else None
    except OSError:   # an unwritable cache: the download below reports it
        f = None
    if f is None:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without flock: unguarded, as before
            pass
        yield   # closing the file drops the lock


def _download(url: str, dest: str, progress: bool, timeout: float) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(dest),
                      disable=not progress) as bar:
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise DownloadError(
            f"Cannot download {url} ({exc}). If this machine is offline, download the file elsewhere and "
            f"place it at {dest} (or set PID_CACHE_DIR to choose the cache folder), or pass a local path instead."
        ) from None
