"""Run directories (`outdir/NNNNN-<desc>/`, numbered as EDM does) and deciding what a resume continues.

`resume=None` starts a new run directory. `resume='auto'` continues the newest run in `outdir` when it was
made with the same configuration (a new run starts when `outdir` has no run with a training state yet), and
refuses with ConfigError when that newest run's configuration differs. `resume=<dir or file>` continues that
run directory or that exact training-state file, after the same check.
"""

import json
import os
import re
from typing import List, Optional, Tuple

from pid.errors import CheckpointError, ConfigError
from pid.training.checkpoint import load_latest_state, read_training_state
from pid.training.config import trajectory_fields

__all__ = ["list_runs", "new_run_dir", "resolve_resume", "config_differences", "CONFIG_FILE"]

CONFIG_FILE = "config.json"
_RUN_RE = re.compile(r"^(\d+)-")


def list_runs(outdir: str) -> List[Tuple[int, str]]:
    """[(run id, path)] of the `NNNNN-*` run directories in outdir, oldest first."""
    if not os.path.isdir(outdir):
        return []
    runs = []
    for name in os.listdir(outdir):
        m = _RUN_RE.match(name)
        if m and os.path.isdir(os.path.join(outdir, name)):
            runs.append((int(m.group(1)), os.path.join(outdir, name)))
    return sorted(runs)


def new_run_dir(outdir: str, desc: str) -> str:
    """Create and return `outdir/NNNNN-desc` with the next free id.

    Two trainers starting at once may pick the same id; the one whose mkdir loses takes the next id.
    """
    os.makedirs(outdir, exist_ok=True)
    runs = list_runs(outdir)
    run_id = runs[-1][0] + 1 if runs else 0
    for attempt in range(100):
        path = os.path.join(outdir, f"{run_id + attempt:05d}-{desc}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"cannot create a new run directory in {outdir}: ids {run_id:05d} to {run_id + 99:05d} "
                      f"are taken by concurrent starts; try again")


def _comparable(run_config: dict) -> dict:
    # Only what changes the weights' trajectory counts: logging cadence, paths and the step budget
    # (under a constant LR) may change when a run is resumed.
    return {"train": trajectory_fields(run_config.get("train", {})),
            "method": run_config.get("method"), "extra": run_config.get("extra")}


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


# Settings added after runs were first written: (the section a run must have for the setting to apply, the value
# an older config.json implies, i.e. the behaviour that run was trained with). An old run then resumes when nothing
# it depends on changed, and is refused, naming the setting, when something did.
_ADDED_SINCE = {
    "method.distance.lpips_pool": ("method.distance.", "max"),        # LPIPS was the lpips package's (max pooling)
    "extra.pid.lpips_pool": ("extra.pid.", "max"),
    "method.residual_precision": ("method.distance.", "amp"),         # PID's student ran under autocast
    "extra.pid.residual_precision": ("extra.pid.", "amp"),
    "extra.mm.mixture_adjust": ("extra.mm.", False),                  # MM had no mixture corrections
    "extra.student.denoiser.adjust": ("extra.student.denoiser.", None),
}


def _effective(flat: dict) -> dict:
    """Fill the settings an older run lacks, and drop those that cannot change this run's trajectory."""
    out = dict(flat)
    for key, (section, value) in _ADDED_SINCE.items():
        has_section = any(k.startswith(section) for k in flat)
        if has_section and not any(k == key or k.startswith(key + ".") for k in flat):
            out[key] = value
    drop = set()
    if out.get("method.distance.name") not in (None, "lpips"):
        drop |= {"method.distance.lpips_pool", "extra.pid.lpips_pool"}
    if out.get("train.precision") == "fp32":
        drop |= {"method.residual_precision", "extra.pid.residual_precision"}
    if out.get("extra.student.denoiser.kind") == "edm":   # an EDM network is copied whole: the option is ignored
        drop.add("extra.mm.mixture_adjust")
    return {k: v for k, v in out.items() if k not in drop}


def config_differences(saved: dict, current: dict) -> List[str]:
    """Human-readable 'key: saved -> now' lines for the trajectory-relevant fields that differ."""
    a, b = _effective(_flatten(_comparable(saved))), _effective(_flatten(_comparable(current)))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _require_same(saved: dict, current: dict, where: str) -> None:
    diffs = config_differences(saved, current)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        hint = ""
        linear = (saved.get("train") or {}).get("lr_schedule") == "linear"
        if linear and any(d.startswith("train.steps:") for d in diffs):
            hint = (" (its learning rate decays linearly to 0 at --steps, so the step count is part of the run; "
                    "runs with --lr-schedule=constant can be extended)")
        raise ConfigError(f"cannot resume {where}: it was trained with a different configuration ({shown}){hint}. "
                          f"Use the original options, or start a new run (another --outdir, or no --resume)")


def _read_config(run_dir: str) -> Optional[dict]:
    path = os.path.join(run_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def resolve_resume(resume: Optional[str], outdir: str, run_config: dict
                   ) -> Tuple[Optional[str], Optional[str], Optional[dict]]:
    """(run_dir, training-state path, its contents) to continue, or (None, None, None) for a new run.

    Raises ConfigError when the run to continue has another configuration, CheckpointError when an explicit
    path holds no usable training state.
    """
    if resume is None:
        return None, None, None
    if resume == "auto":
        runs = list_runs(outdir)
        if not runs:
            return None, None, None
        run_dir = runs[-1][1]
        saved = _read_config(run_dir)
        if saved is None:   # a run that died before writing its config: nothing to continue
            return None, None, None
        _require_same(saved, run_config, f"{run_dir} (the newest run in {outdir})")
        latest = load_latest_state(run_dir)
        return (run_dir, *latest) if latest else (None, None, None)
    if os.path.isdir(resume):
        latest = load_latest_state(resume)
        if latest is None:
            raise CheckpointError(f"--resume={resume}: no usable training-state-*.pt in that directory")
        path, state = latest
    else:
        path, state = resume, read_training_state(resume)
    _require_same(state.get("config", {}), run_config, path)
    return os.path.dirname(os.path.abspath(path)), path, state
