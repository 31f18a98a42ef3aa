"""Plots: pid/report.py and report.py (the figure of one or more runs)."""

import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pid.report import draw_report, figure_size, read_run, curve_panels
from tests.conftest import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
import report  # noqa: E402
import train_pid  # noqa: E402

TINY_EVAL = ["--student-preset=tiny", "--teacher=builtin:glyphs16", "--batch=4", "--discretization=8", "--log-every=1",
             "--steps=4", "--snap=4", "--eval-every=2", "--eval-num=6", "--grid-every=2", "--grid-seeds=4"]
PID_PANELS = ["loss", "lr", "rmse", "component_accuracy", "log_likelihood"]   # and one sample grid


def train_cli(outdir, *args) -> str:
    result = CliRunner().invoke(train_pid.main, [f"--outdir={outdir}", *TINY_EVAL, *args])
    assert result.exit_code == 0, result.output
    (run_dir,) = glob.glob(os.path.join(outdir, "*"))
    return run_dir


@pytest.fixture(scope="module")
def pid_run(tmp_path_factory) -> str:
    """A real 4-step PID run on builtin:glyphs16 with evaluations at steps 2 and 4 and grids at 0, 2, 4."""
    return train_cli(str(tmp_path_factory.mktemp("report") / "runs"))


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def axes_box(ax, height: int):
    """Pixel rows and columns (PNG: row 0 at the top) inside an axes' frame, 2 pixels in from its spines."""
    box = ax.get_window_extent()
    return (slice(int(height - box.y1) + 2, int(height - box.y0) - 2), slice(int(box.x0) + 2, int(box.x1) - 2))


def run_report(args):
    result = CliRunner().invoke(report.main, args)
    assert "Traceback" not in result.output, result.output
    return result


def assert_one_error_line(result, *needles):
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


# ------------------------------------------------------------------------------------------------ report.py
def test_report_of_a_short_run_has_its_size_and_its_curves(pid_run, tmp_path):
    out = str(tmp_path / "report.png")
    result = run_report([pid_run, f"--out={out}", "--dpi=50"])
    assert result.exit_code == 0, result.output
    assert curve_panels([read_run(pid_run)]) == PID_PANELS
    assert figure_size(len(PID_PANELS) + 1) == (12.0, 6.0)        # 3 panels of 4 x 3 inches per row, 2 rows
    drawn = pixels(out)
    assert drawn.shape == (300, 600, 3)                           # 12 x 6 inches at 50 dpi
    # The same figure with its curves hidden is the blank plot of this layout: every curve panel must differ.
    fig = draw_report([read_run(pid_run)], dpi=50)
    for ax in fig.axes:
        for line in ax.lines:
            line.set_visible(False)
    blank_path = str(tmp_path / "blank.png")
    fig.savefig(blank_path, format="png", dpi=50)
    blank = pixels(blank_path)
    assert blank.shape == drawn.shape
    for key, ax in zip(PID_PANELS, fig.axes):
        rows, cols = axes_box(ax, drawn.shape[0])
        changed = int((np.abs(drawn[rows, cols] - blank[rows, cols]).sum(axis=2) > 60).sum())
        assert changed >= 20, (key, changed)
    # The last panel is the newest grid (step 4, 2 x 2 images of 16 x 16): the image itself, not a white square.
    rows, cols = axes_box(fig.axes[len(PID_PANELS)], drawn.shape[0])
    assert fig.axes[len(PID_PANELS)].get_title().endswith("samples, step 4")
    grid = pixels(os.path.join(pid_run, "samples-0000004.png"))
    assert drawn[rows, cols].mean() < 240 and abs(drawn[rows, cols].mean() - grid.mean()) < 10


def test_several_runs_are_overlaid_with_their_names(pid_run, tmp_path):
    other = str(tmp_path / "other-run")
    shutil.copytree(pid_run, other)
    with open(os.path.join(other, "stats.jsonl")) as f:
        stats = [json.loads(line) for line in f]
    with open(os.path.join(other, "stats.jsonl"), "w") as f:
        f.writelines(json.dumps({**r, "loss": r["loss"] * 3}) + "\n" for r in stats)
    runs = [read_run(pid_run), read_run(other)]
    fig = draw_report(runs)
    loss = fig.axes[0]
    assert [line.get_label() for line in loss.lines] == [os.path.basename(pid_run), "other-run"]
    assert np.allclose(loss.lines[1].get_ydata(), 3 * loss.lines[0].get_ydata())
    assert [t.get_text() for t in loss.get_legend().get_texts()] == [os.path.basename(pid_run), "other-run"]
    assert len(fig.axes) == len(PID_PANELS) + 2                  # a grid per run
    out = str(tmp_path / "two.png")
    assert run_report([pid_run, other, f"--out={out}", "--dpi=40"]).exit_code == 0
    assert pixels(out).shape == (360, 480, 3)                    # 7 panels: 3 rows of 3


def test_report_errors_are_one_line(pid_run, tmp_path):
    out = f"--out={tmp_path / 'r.png'}"
    assert_one_error_line(run_report([str(tmp_path / "missing"), out]), "missing", "does not exist")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    (empty / "metrics.jsonl").write_text("")
    assert_one_error_line(run_report([str(empty), out]), "nothing to plot")
    killed = str(tmp_path / "killed-run")
    shutil.copytree(pid_run, killed)
    stats = open(os.path.join(killed, "stats.jsonl")).read()
    open(os.path.join(killed, "stats.jsonl"), "w").write(stats[:-25])    # the last line cut mid-record
    lines = stats.count("\n")
    assert_one_error_line(run_report([pid_run, killed, out]), f"stats.jsonl, line {lines}", "--skip-bad-lines")
    assert not os.path.exists(tmp_path / "r.png")
    assert run_report([killed, out, "--skip-bad-lines"]).exit_code == 0
    assert [r["step"] for r in read_run(killed, strict=False).stats] == list(range(1, lines))
    assert_one_error_line(run_report([pid_run, f"--out={tmp_path / 'r.jpg'}"]), "must end in .png")
