"""What a run tells its user: log.txt (text), stats.jsonl (one JSON record per logged step), metrics.jsonl (one
per evaluation), a tqdm bar, and with `tensorboard` the same scalars and grids as TensorBoard events (tracking.py).

Only the main process writes; the others hold a disabled logger so the loop needs no rank checks.
"""

import json
import math
import os
import time
from typing import Dict, Optional

from tqdm import tqdm

__all__ = ["RunLogger", "trim_logs", "STEP_LOGS"]

STEP_LOGS = ("stats.jsonl", "metrics.jsonl")   # files of one JSON record per step, trimmed on resume


class RunLogger:
    """Appends to `run_dir/log.txt` and `run_dir/stats.jsonl`; shows a bar with loss, images/s and ETA."""

    def __init__(self, run_dir: Optional[str], total_steps: int, start_step: int, log_every: int,
                 enabled: bool = True, tensorboard: bool = False):
        self.enabled = enabled and run_dir is not None
        self.run_dir = run_dir
        self.tensorboard = None
        self.log_every = log_every
        self.start_time = time.time()
        self._window: Dict[str, float] = {}
        self._count = 0
        self._img_per_s: Optional[float] = None
        if self.enabled:
            trim_logs(run_dir, start_step)
            self._log = open(os.path.join(run_dir, "log.txt"), "a", buffering=1)
            self._stats = open(os.path.join(run_dir, "stats.jsonl"), "a", buffering=1)
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if tensorboard:
                from pid.training.tracking import TensorBoardLog
                self.tensorboard = TensorBoardLog(run_dir, start_step)

    def info(self, message: str) -> None:
        """One timestamped line in log.txt, also shown above the bar."""
        if self.enabled:
            line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
            self._log.write(line + "\n")
            tqdm.write(line)

    def error(self, message: str) -> None:
        """Like `info`, for a failure that is about to stop the run: never raises (the disk may be full)."""
        try:
            self.info(f"ERROR: {message}")
        except OSError:
            pass

    def step(self, step: int, record: dict, images: int, seconds: float) -> None:
        """Account one finished optimizer step (`step` = steps done); flush a stats line every log_every.

        record: scalars of this step ('loss', 'lr', 'grad_norm', method stats, 'skipped', ...).
        """
        if not self.enabled:
            return
        rate = images / max(seconds, 1e-9)
        self._img_per_s = rate if self._img_per_s is None else 0.9 * self._img_per_s + 0.1 * rate
        if not record.get("skipped"):
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "nan_skipped_total":
                    self._window[k] = self._window.get(k, 0.0) + float(v)
            self._count += 1
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4g}", img_s=f"{self._img_per_s:.1f}")
        if record.get("skipped") or (self.log_every and step % self.log_every == 0):
            self._flush(step, record, seconds)

    def _flush(self, step: int, record: dict, seconds: float) -> None:
        # Scalars are averaged over the steps since the last line; the last step's values are kept when
        # there were no successful steps (a skipped step is always logged as it happened).
        means = {k: v / self._count for k, v in self._window.items()} if self._count else dict(record)
        means.pop("skipped", None)
        out = {"step": step, **means, "skipped": bool(record.get("skipped", False)),
               "nan_skipped_total": record.get("nan_skipped_total", 0),
               "sec_per_step": seconds, "img_per_sec": self._img_per_s,
               "time": time.time() - self.start_time}
        # Non-finite numbers become null: strict JSON readers (jq, JavaScript) reject NaN.
        line = {k: _finite_or_none(v) for k, v in out.items()}
        self._stats.write(json.dumps(line) + "\n")
        self._track(lambda tb: tb.scalars("train", line, step))
        text = " ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in out.items())
        self.info(text)
        self._window, self._count = {}, 0

    def metrics(self, step: int, metrics: dict) -> None:
        """Append an evaluation's metrics to metrics.jsonl (and TensorBoard's `eval/<key>`)."""
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        # Evaluations are rare: their events never wait for the next snapshot's flush.
        self._track(lambda tb: (tb.scalars("eval", metrics, step), tb.flush()))

    def image(self, path: str, step: int) -> None:
        """A sample grid just written to `path` (TensorBoard's image `samples`; the PNG is the record)."""
        if self.enabled:
            self._track(lambda tb: (tb.image("samples", path, step), tb.flush()))

    def flush_tracking(self) -> None:
        """Write TensorBoard's buffered events; called before a training state is written (no gaps after a kill)."""
        if self.enabled:
            self._track(lambda tb: tb.flush())

    def _track(self, write) -> None:
        # TensorBoard mirrors files the run writes anyway: if it fails (a full disk), say so once and go on
        # without it; the jsonl files and snapshots decide whether the run can continue.
        if self.tensorboard is None:
            return
        try:
            write(self.tensorboard)
        except Exception as exc:
            self.tensorboard = None
            try:
                self.info(f"warning: TensorBoard logging stopped: {type(exc).__name__}: {exc}")
            except OSError:   # the same full disk
                pass

    def close(self) -> None:
        """Close the files and the bar."""
        if self.enabled:
            self.bar.close()
            self._track(lambda tb: tb.close())
            for f in (self._log, self._stats):
                try:
                    f.close()
                except OSError:   # a full disk fails the final flush; the error that stopped the run matters
                    pass


def trim_logs(run_dir: str, step: int) -> None:
    """Drop the records after `step` from stats.jsonl and metrics.jsonl before a run continues from `step`.

    A run killed after its last snapshot logged steps that the resumed run repeats; without this the files
    would hold those steps twice. Each file is rewritten atomically; unreadable lines are kept as they are.
    """
    for name in STEP_LOGS:
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            lines = f.readlines()
        kept = [line for line in lines if _step_of(line) is None or _step_of(line) <= step]
        if len(kept) < len(lines) or (kept and not kept[-1].endswith("\n")):
            kept = [line if line.endswith("\n") else line + "\n" for line in kept]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)


def _step_of(line: str) -> Optional[int]:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
