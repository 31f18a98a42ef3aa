"""Experiment tracking beside the jsonl logs: TensorBoard event files and the run's own `report.png`.

TensorBoard (`--tensorboard=true`, main process only) receives what the run directory's files hold: every
stats.jsonl line as `train/<key>` scalars, every metrics.jsonl record as `eval/<key>`, and every
samples-<step>.png as the image `samples`, each at global step = the optimizer step. The files go to
`run_dir/tensorboard/`. A resumed run continues from a saved step S and opens its writer with purge_step S + 1:
TensorBoard then drops the events of steps > S that the earlier process wrote before it was stopped or killed,
and the resumed run writes them again, so each step appears once (as trim_logs does for the jsonl files). The
writer is flushed before every training state is written, so that a state at step S never exists without the
events up to S: no gaps after a SIGKILL.
"""

import os
import re
import time
from typing import Optional

from pid.errors import ConfigError

__all__ = ["TensorBoardLog", "require_tensorboard", "write_run_report", "TENSORBOARD_DIR", "REPORT_FILE"]

TENSORBOARD_DIR = "tensorboard"
REPORT_FILE = "report.png"


def require_tensorboard() -> None:
    """Raise ConfigError (before any work) when the tensorboard package, which torch's writer needs, is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard imports it too, but may already be cached)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("--tensorboard=true needs the tensorboard package, which is not installed: "
                          "pip install tensorboard (or pip install -e '.[tensorboard]'), or use "
                          "--tensorboard=false") from None


def write_run_report(run_dir: str) -> str:
    """Draw `run_dir/report.png` (pid.report's figure of this one run), atomically; returns its path.

    Damaged log lines are skipped here: the run's own plot must not stop because of one line."""
    from pid.report import read_run, write_report
    path = os.path.join(run_dir, REPORT_FILE)
    write_report([read_run(run_dir, strict=False)], path)
    return path


def _start_after_earlier_writers(logdir: str, max_wait: float = 2.0) -> None:
    """Wait until the clock's second is later than that of every event file in `logdir`.

    TensorBoard reads a folder's event files in name order, and a name is `events.out.tfevents.<start time in
    whole seconds>.<host>.<pid>...`: a writer started in the same second as the killed one before it (say a kill
    right after the start) would sort by process id, possibly first, and its purge would come before the events
    it is meant to replace."""
    if not os.path.isdir(logdir):
        return
    stamps = [int(m.group(1)) for name in os.listdir(logdir) if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", name))]
    deadline = time.time() + max_wait   # a file from the future (a clock set back) is not waited for
    while stamps and int(time.time()) <= max(stamps) and time.time() < deadline:
        time.sleep(0.05)


def _number(value) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


class TensorBoardLog:
    """A SummaryWriter on `run_dir/tensorboard/` for a run that starts (or resumes) at `start_step`."""

    def __init__(self, run_dir: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        # A fresh run has nothing to purge; a resumed one drops the earlier process's steps > start_step.
        purge = start_step + 1 if start_step > 0 else None
        logdir = os.path.join(run_dir, TENSORBOARD_DIR)
        _start_after_earlier_writers(logdir)
        self.writer = SummaryWriter(logdir, purge_step=purge)

    def scalars(self, group: str, record: dict, step: int) -> None:
        """`group/<key>` for every number of `record` except its 'step' (None and booleans are left out: a
        skipped step's null loss is a gap, as in the jsonl file)."""
        for key, value in record.items():
            number = _number(value)
            if key != "step" and number is not None:
                self.writer.add_scalar(f"{group}/{key}", number, step)

    def image(self, tag: str, path: str, step: int) -> None:
        """The PNG at `path` (uint8, L or RGB) as image `tag` at `step`."""
        import numpy as np
        from PIL import Image
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def flush(self) -> None:
        """Write what is buffered to the event file."""
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
