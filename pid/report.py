"""Curves of training runs as one PNG: loss, learning rate and every evaluated metric against step, several
runs overlaid, and each run's newest sample grid (`report.py`, and `report.png` written by the trainer).

A run directory is read from its `stats.jsonl` (one record per logged step), `metrics.jsonl` (one record per
evaluation) and `samples-<step>.png`. Figures are drawn on a `matplotlib.figure.Figure` with the Agg canvas,
never through pyplot: no global backend or figure state, so the trainer can draw from any thread or process.
"""

import dataclasses
import json
import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from pid.errors import ConfigError, DataError

__all__ = ["RunLog", "read_records", "read_run", "curve_panels", "figure_size", "draw_report", "write_report",
           "report_names", "PANEL_INCHES", "COLUMNS"]

COLUMNS = 3                    # panels per row
PANEL_INCHES = (4.0, 3.0)      # width, height of one panel
_GRID_RE = re.compile(r"^samples-(\d+)\.png$")

# Titles of the scalars our trainers and evaluators write (anything else is titled by its key).
_TITLES = {
    "loss": "training loss", "lr": "learning rate", "fid": "FID", "is": "Inception Score",
    "fd_exact": "FD to the exact mixture", "component_tv": "component-frequency TV",
    "rms_to_mean": "RMS to the nearest component mean", "rmse": "RMSE to the exact ODE endpoint",
    "component_accuracy": "component accuracy", "log_likelihood": "log-likelihood (nats)",
}
_STAT_PANELS = ("loss", "lr")  # from stats.jsonl; every other panel is a metric of metrics.jsonl


@dataclasses.dataclass
class RunLog:
    """What a report shows of one run: its name, stats and metrics records (oldest first) and newest grid."""
    name: str
    stats: List[dict]
    metrics: List[dict]
    grid: Optional[str] = None          # path of the newest samples-<step>.png
    grid_step: Optional[int] = None


def read_records(path: str, strict: bool = True) -> List[dict]:
    """The records of a jsonl log (`{"step": int, ...}` per line); [] when the file does not exist.

    strict: a line that is not such a record (a run killed while writing it) raises DataError naming the file
    and line; otherwise such lines are skipped (the trainer's own plot must not stop on one damaged line).
    """
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                ok = isinstance(record, dict) and isinstance(record.get("step"), int)
            except ValueError:
                ok = False
            if ok:
                records.append(record)
            elif strict:
                raise DataError(f"{path}, line {number}: not a JSON record with an integer 'step' (a run killed "
                                f"while writing it leaves a truncated line); delete that line, or pass "
                                f"--skip-bad-lines")
    return records


def _newest_grid(run_dir: str) -> Tuple[Optional[str], Optional[int]]:
    grids = [(int(m.group(1)), name) for name in os.listdir(run_dir) if (m := _GRID_RE.match(name))]
    if not grids:
        return None, None
    step, name = max(grids)
    return os.path.join(run_dir, name), step


def read_run(run_dir: str, name: Optional[str] = None, strict: bool = True) -> RunLog:
    """Read a run directory (name: its basename unless given). Raises ConfigError when it is not a directory,
    DataError when it has logged nothing (no record in stats.jsonl or metrics.jsonl) or, with `strict`, when a
    log line is damaged (see `read_records`)."""
    if not os.path.isdir(run_dir):
        raise ConfigError(f"run directory {run_dir} does not exist (or is not a directory); give a folder that a "
                          f"training run wrote (outdir/NNNNN-<desc>/)")
    stats = read_records(os.path.join(run_dir, "stats.jsonl"), strict)
    metrics = read_records(os.path.join(run_dir, "metrics.jsonl"), strict)
    if not stats and not metrics:
        raise DataError(f"{run_dir} has no records in stats.jsonl or metrics.jsonl: nothing to plot (not a run "
                        f"directory, or the run has not logged a step yet)")
    grid, grid_step = _newest_grid(run_dir)
    return RunLog(name or os.path.basename(os.path.normpath(run_dir)), stats, metrics, grid, grid_step)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def curve_panels(runs: Sequence[RunLog]) -> List[str]:
    """The keys drawn against step, in order: loss and lr (when logged), then every metric in first-seen order.

    A metric `data_<key>` (the exact data's floor) is drawn as a dashed line in `<key>`'s panel and `<key>_std`
    is left out; neither gets a panel of its own."""
    keys = [k for k in _STAT_PANELS if any(_is_number(r.get(k)) for run in runs for r in run.stats)]
    for run in runs:
        for record in run.metrics:
            for k, v in record.items():
                if k != "step" and _is_number(v) and k not in keys and not k.startswith("data_") \
                        and not k.endswith("_std"):
                    keys.append(k)
    return keys


def figure_size(num_panels: int) -> Tuple[float, float]:
    """(width, height) in inches of a report with `num_panels` panels (curves and grids): COLUMNS per row."""
    rows = max(1, math.ceil(num_panels / COLUMNS))
    return COLUMNS * PANEL_INCHES[0], rows * PANEL_INCHES[1]


def _series(records: List[dict], key: str) -> Tuple[np.ndarray, np.ndarray]:
    rows = [(r["step"], r.get(key)) for r in records if key in r]
    steps = np.array([s for s, _ in rows], dtype=np.float64)
    values = np.array([v if _is_number(v) else np.nan for _, v in rows], dtype=np.float64)  # null = a gap
    return steps, values


def _draw_curves(ax, runs: Sequence[RunLog], key: str) -> None:
    from matplotlib.ticker import MaxNLocator
    source = "stats" if key in _STAT_PANELS else "metrics"
    positive = True
    for i, run in enumerate(runs):
        records = getattr(run, source)
        steps, values = _series(records, key)
        if len(steps):
            ax.plot(steps, values, color=f"C{i % 10}", label=run.name, marker="." if len(steps) < 30 else None)
            positive &= bool(np.all(values[np.isfinite(values)] > 0))
        floor_steps, floor = _series(records, f"data_{key}")
        if np.isfinite(floor).any():
            ax.axhline(float(np.nanmean(floor)), color=f"C{i % 10}", linestyle="--", linewidth=0.8)
    if key == "loss" and positive and ax.lines:
        ax.set_yscale("log")   # losses fall over orders of magnitude
    title = _TITLES.get(key, key)
    ax.set_title(title + (" (dashed: exact data)" if any(f"data_{key}" in r for run in runs for r in run.metrics)
                          else ""), fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)


def _draw_grid(ax, run: RunLog) -> None:
    from PIL import Image
    with Image.open(run.grid) as image:
        pixels = np.asarray(image.convert("RGB"))
    ax.imshow(pixels, interpolation="nearest")
    ax.set_title(f"{run.name}\nsamples, step {run.grid_step}", fontsize=8)
    ax.set_axis_off()


def draw_report(runs: Sequence[RunLog], dpi: float = 100):
    """A `matplotlib.figure.Figure` of `figure_size(panels)` inches: one panel per key of `curve_panels` (runs
    overlaid, coloured C0, C1, ... in order, named in the first panel's legend), then each run's newest sample
    grid. Its PNG is width·dpi × height·dpi pixels."""
    from matplotlib.figure import Figure
    keys = curve_panels(runs)
    grids = [run for run in runs if run.grid is not None]
    fig = Figure(figsize=figure_size(len(keys) + len(grids)), dpi=dpi, layout="constrained")
    rows = math.ceil((len(keys) + len(grids)) / COLUMNS) or 1
    for index, key in enumerate(keys):
        _draw_curves(fig.add_subplot(rows, COLUMNS, index + 1), runs, key)
    for index, run in enumerate(grids):
        _draw_grid(fig.add_subplot(rows, COLUMNS, len(keys) + index + 1), run)
    if fig.axes and fig.axes[0].lines:
        fig.axes[0].legend(fontsize=7)
    return fig


def write_report(runs: Sequence[RunLog], path: str, dpi: float = 100) -> None:
    """Draw the report of `runs` and write it as a PNG at `path`, atomically (temporary file, then rename)."""
    tmp = f"{path}.tmp"
    try:
        draw_report(runs, dpi).savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def report_names(run_dirs: Sequence[str]) -> Dict[str, str]:
    """{run_dir: legend name}: the basename, or the path as given where two runs share a basename."""
    base = {d: os.path.basename(os.path.normpath(d)) for d in run_dirs}
    counts: Dict[str, int] = {}
    for name in base.values():
        counts[name] = counts.get(name, 0) + 1
    return {d: (name if counts[name] == 1 else os.path.normpath(d)) for d, name in base.items()}
