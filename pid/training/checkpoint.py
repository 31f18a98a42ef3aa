"""Checkpoint files: atomic writes, the student checkpoint (what sampling needs), the training state (exact
resume), and finding the newest complete state of a run.

Every file is a plain dict of tensors, numbers, strings, lists and dicts, so `torch.load(path,
weights_only=True)` reads it without running any code from the file.
"""

import glob
import os
import re
import shutil
import warnings
from typing import Any, Dict, Optional, Tuple

import torch

from pid.errors import CheckpointError

__all__ = ["atomic_save", "write_student_checkpoint", "read_student_checkpoint", "is_student_checkpoint",
           "write_training_state", "read_training_state", "state_path", "student_path", "list_states", "list_students",
           "load_latest_state", "STUDENT_FORMAT", "STATE_FORMAT", "student_weights"]

STUDENT_FORMAT = "pid-student"
STATE_FORMAT = "pid-training-state"
VERSION = 1
_STATE_RE = re.compile(r"^training-state-(\d+)\.pt$")
_STUDENT_RE = re.compile(r"^student-(\d+)\.pt$")


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync it, then rename over `path`.

    A crash at any moment leaves either the old file or the complete new one at `path`, never a partial
    file; the temporary file is removed when the write fails. A failed write (disk full, file-size limit,
    read-only folder) raises CheckpointError naming the file, and the previous file at `path` is untouched.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a short write as a RuntimeError
        _remove_quietly(tmp)
        raise CheckpointError(_write_failure(path, exc)) from None
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(folder)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_failure(path: str, exc: BaseException) -> str:
    reason = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0] if str(exc)
              else type(exc).__name__)
    try:
        free = f"{shutil.disk_usage(os.path.dirname(path)).free / 2 ** 20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return (f"could not write {path} ({reason}; {free}). The disk may be full, over a quota or file-size "
            f"limit, or the folder read-only; earlier files are intact. Free space, then continue with "
            f"--resume=auto")


def _fsync_dir(folder: str) -> None:
    # The rename itself is durable only once the directory entry is on disk (POSIX; skipped elsewhere).
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _load(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes: all mean "not a usable file"
        raise CheckpointError(f"{what} {path} is corrupt or truncated, or not a torch file "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              f"use another snapshot") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a {what} (it holds a {type(data).__name__}, not a dict)")
    return data


def _check_format(data: dict, path: str, fmt: str, what: str) -> None:
    if data.get("format") != fmt:
        raise CheckpointError(f"{path} is not a {what} (format {data.get('format')!r}, expected {fmt!r})")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path}: {what} version {data.get('version')!r} is not supported "
                              f"(this pid reads version {VERSION}); upgrade pid or re-export the file")


def write_student_checkpoint(path: str, spec: dict, ema_state_dicts: Dict[str, Dict[str, torch.Tensor]],
                             default_ema: str, step: int, extra: Optional[dict] = None) -> None:
    """Atomically write a student checkpoint: everything sampling needs, nothing else.

    spec: JSON-able description to rebuild the module without weights (`student.export_spec()`).
    ema_state_dicts: {'0.9999': state_dict, ...} (CPU tensors); 'raw' may name the un-averaged weights.
    default_ema: the key sampling uses unless told otherwise. step: optimizer steps trained.
    """
    if default_ema not in ema_state_dicts:
        raise ValueError(f"default_ema {default_ema!r} not among {list(ema_state_dicts)}")
    data = {"format": STUDENT_FORMAT, "version": VERSION, "spec": spec,
            "emas": {str(k): _cpu(sd) for k, sd in ema_state_dicts.items()},
            "default_ema": str(default_ema), "step": int(step)}
    data.update(extra or {})
    atomic_save(data, path)


def read_student_checkpoint(path: str) -> dict:
    """Read and check a student checkpoint (weights_only); CheckpointError says what is wrong."""
    data = _load(path, "student checkpoint")
    _check_format(data, path, STUDENT_FORMAT, "student checkpoint")
    if not isinstance(data.get("emas"), dict) or data.get("default_ema") not in data["emas"]:
        raise CheckpointError(f"{path}: student checkpoint has no weights for its default EMA "
                              f"{data.get('default_ema')!r}; the file is damaged")
    return data


def is_student_checkpoint(path: str) -> bool:
    """True when `path` is a readable pid student checkpoint."""
    try:
        read_student_checkpoint(path)
        return True
    except CheckpointError:
        return False


def _cpu(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def state_path(run_dir: str, step: int) -> str:
    """`run_dir/training-state-<step:07d>.pt`."""
    return os.path.join(run_dir, f"training-state-{step:07d}.pt")


def student_path(run_dir: str, step: int) -> str:
    """`run_dir/student-<step:07d>.pt`."""
    return os.path.join(run_dir, f"student-{step:07d}.pt")


def write_training_state(path: str, state: dict) -> None:
    """Atomically write a training state (a dict from the trainer; format/version are added here)."""
    atomic_save({"format": STATE_FORMAT, "version": VERSION, **state}, path)


def read_training_state(path: str) -> dict:
    """Read and check a training-state file (weights_only); CheckpointError says what is wrong."""
    data = _load(path, "training state")
    _check_format(data, path, STATE_FORMAT, "training state")
    return data


def list_states(run_dir: str) -> Dict[int, str]:
    """{step: path} of the training-state files in a run directory (temporary files excluded)."""
    return _list_numbered(run_dir, "training-state-*.pt", _STATE_RE)


def list_students(run_dir: str) -> Dict[int, str]:
    """{step: path} of the student snapshots `student-<step>.pt` in a run directory (not student-best.pt)."""
    return _list_numbered(run_dir, "student-*.pt", _STUDENT_RE)


def _list_numbered(run_dir: str, pattern: str, regex: "re.Pattern") -> Dict[int, str]:
    found = {}
    for path in glob.glob(os.path.join(glob.escape(run_dir), pattern)):
        m = regex.match(os.path.basename(path))
        if m:
            found[int(m.group(1))] = path
    return dict(sorted(found.items()))


def load_latest_state(run_dir: str) -> Optional[Tuple[str, dict]]:
    """(path, contents) of the newest training state in `run_dir` that loads, or None.

    Writes are atomic, so a damaged file means the disk or a user altered it; it is skipped with a warning
    and the next older one is used.
    """
    for _, path in sorted(list_states(run_dir).items(), reverse=True):
        try:
            return path, read_training_state(path)
        except CheckpointError as exc:
            warnings.warn(f"skipping unusable training state: {exc}")
    return None


def student_weights(path: str, ema: Optional[str] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(spec, state_dict) of a student checkpoint with the chosen EMA (default: the file's default EMA)."""
    ckpt = read_student_checkpoint(path)
    name = str(ema) if ema is not None else ckpt["default_ema"]
    if name not in ckpt["emas"]:
        raise CheckpointError(f"{path} has no EMA {name!r}; available: {', '.join(sorted(ckpt['emas']))} (snapshots "
                              f"hold the default EMA only unless the run used --snap-emas=all)")
    return ckpt["spec"], ckpt["emas"][name]
