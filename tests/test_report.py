"""Plots and experiment tracking: pid/report.py and report.py (the figure of one or more runs), the trainer's own
report.png, and --tensorboard (pid/training/tracking.py): one event per logged step, also across a resume."""

import glob
import json
import os
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pid.errors import ConfigError
from pid.report import draw_report, figure_size, read_run, curve_panels
from pid.training import train
from tests.conftest import REPO_ROOT
from training_helpers import ToyMethod, ToyStudent, toy_config

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


# ------------------------------------------------------------------------------------ the trainer's report.png
def test_trainer_writes_report_png_unless_plot_false(pid_run, tmp_path):
    path = os.path.join(pid_run, "report.png")
    assert pixels(path).shape == (600, 1200, 3)                  # drawn at 100 dpi after the evaluation at step 4
    assert not [name for name in os.listdir(pid_run) if name.endswith(".tmp")]
    quiet = train_cli(str(tmp_path / "runs"), "--plot=false", "--steps=2", "--eval-every=1")
    assert "metrics.jsonl" in os.listdir(quiet) and "report.png" not in os.listdir(quiet)


def test_a_plot_that_fails_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    import pid.report

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pid.report, "write_report", broken)
    evaluate = lambda student: {"metrics": {"fid": 1.0}, "primary": "fid"}   # noqa: E731
    run_dir = train(toy_config(str(tmp_path), steps=2, eval_every=1), ToyMethod(), ToyStudent(), evaluate=evaluate)
    assert not run_dir.interrupted and os.path.exists(os.path.join(run_dir, "student-0000002.pt"))
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert log.count("warning: report.png not written") == 2 and "No space left on device" in log


def test_a_tensorboard_write_that_fails_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    from pid.training.tracking import TensorBoardLog

    def broken(self, *args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(TensorBoardLog, "flush", broken)
    run_dir = train(toy_config(str(tmp_path), steps=4, snap=2, tensorboard=True), ToyMethod(), ToyStudent())
    assert not run_dir.interrupted and os.path.exists(os.path.join(run_dir, "training-state-0000004.pt"))
    log = open(os.path.join(run_dir, "log.txt")).read()
    assert log.count("warning: TensorBoard logging stopped: OSError") == 1
    assert [r["step"] for r in map(json.loads, open(os.path.join(run_dir, "stats.jsonl")))] == [1, 2, 3, 4]


def test_plot_and_tensorboard_may_change_on_resume(tmp_path):
    run_dir = train(toy_config(str(tmp_path), steps=2), ToyMethod(), ToyStudent())
    again = train(toy_config(str(tmp_path), steps=4, resume="auto", plot=False, tensorboard=True), ToyMethod(),
                  ToyStudent())
    assert again == run_dir and os.path.isdir(os.path.join(run_dir, "tensorboard"))


# --------------------------------------------------------------------------------------------- --tensorboard
def tensorboard_events(run_dir: str):
    """(scalars {tag: [(step, value)]}, image steps) of every event file, read the way TensorBoard does
    (events a resumed writer's purge_step discards are dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    images = [e.step for e in events.Images("samples")] if "samples" in events.Tags()["images"] else []
    return scalars, images


def test_tensorboard_holds_each_logged_step_once_across_a_resume(tmp_path):
    """A run of 6 steps, then resumed from its step-4 state: TensorBoard must show steps 1..6 once each, equal to
    stats.jsonl, as if the run had not been repeated (the second writer purges steps 5 and 6)."""
    def evaluate(student):
        return {"metrics": {"fid": float(student.net[0].weight.sum())}, "primary": "fid"}

    settings = dict(steps=6, snap=2, keep_states=0, eval_every=2, grid_every=2, grid_seeds=4, tensorboard=True)
    run_dir = train(toy_config(str(tmp_path), **settings), ToyMethod(), ToyStudent(), evaluate=evaluate)
    first_run = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    resume = os.path.join(run_dir, "training-state-0000004.pt")
    train(toy_config(str(tmp_path), **settings, resume=resume), ToyMethod(), ToyStudent(), evaluate=evaluate)
    assert len(glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))) == 2
    stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in stats] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in metrics] == [2, 4, 6]
    scalars, images = tensorboard_events(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert np.allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in stats], rtol=1e-6)
    assert np.allclose([v for _, v in scalars["train/loss"]], [r["loss"] for r in first_run], rtol=1e-6)
    for key in ("lr", "grad_norm", "out_mean", "sec_per_step"):
        assert [s for s, _ in scalars[f"train/{key}"]] == [1, 2, 3, 4, 5, 6], key
    assert [s for s, _ in scalars["eval/fid"]] == [2, 4, 6]
    assert np.allclose([v for _, v in scalars["eval/fid"]], [m["fid"] for m in metrics], rtol=1e-6)
    assert images == [0, 2, 4, 6]


def test_tensorboard_after_sigkill_has_no_gaps(tmp_path):
    """Killed after step 5 (state at 4, events flushed up to the evaluation at 5): the resumed run's steps
    5 and 6 replace the killed run's step 5, and steps 1..4, written before state 4, are all there."""
    import signal
    import time
    import torch.multiprocessing as mp

    outdir, marker = str(tmp_path / "runs"), str(tmp_path / "hanging")
    settings = dict(steps=6, snap=2, eval_every=5, tensorboard=True, plot=False)
    evaluate = lambda student: {"metrics": {"fid": 2.0}, "primary": "fid"}   # noqa: E731
    proc = mp.get_context("fork").Process(target=_train_hanging, args=(outdir, settings, 5, marker))
    proc.start()
    deadline = time.time() + 120
    while not os.path.exists(marker):
        assert proc.is_alive() and time.time() < deadline, "the training child never reached the hanging step"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    (run_dir,) = glob.glob(os.path.join(outdir, "*"))
    killed, _ = tensorboard_events(run_dir)
    assert [s for s, _ in killed["train/loss"]] == [1, 2, 3, 4, 5]   # step 5 was flushed with its evaluation
    train(toy_config(outdir, **settings, resume="auto"), ToyMethod(), ToyStudent(), evaluate=evaluate)
    scalars, _ = tensorboard_events(run_dir)
    stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    assert [s for s, _ in scalars["train/loss"]] == [r["step"] for r in stats] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in scalars["eval/fid"]] == [5, 6]


def _train_hanging(outdir, settings, hang_at_call, marker):
    import torch
    torch.set_num_threads(1)
    evaluate = lambda student: {"metrics": {"fid": 2.0}, "primary": "fid"}   # noqa: E731
    train(toy_config(outdir, **settings, resume="auto"), ToyMethod(hang_at_call=hang_at_call, marker=marker),
          ToyStudent(), evaluate=evaluate)


def test_tensorboard_without_the_package_is_one_error_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # `import tensorboard` now raises ImportError
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        train(toy_config(str(tmp_path / "lib"), tensorboard=True), ToyMethod(), ToyStudent())
    assert not os.path.exists(tmp_path / "lib")
    result = CliRunner().invoke(train_pid.main, [f"--outdir={tmp_path / 'cli'}", *TINY_EVAL, "--tensorboard=true"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "pip install tensorboard" in lines[0], lines
    assert not os.path.exists(tmp_path / "cli")


def test_tensorboard_option_of_the_training_scripts(tmp_path):
    run_dir = train_cli(str(tmp_path / "runs"), "--tensorboard=true", "--steps=2", "--plot=false")
    scalars, images = tensorboard_events(run_dir)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2] and [s for s, _ in scalars["eval/rmse"]] == [2]
    assert images == [0, 2]
    assert json.load(open(os.path.join(run_dir, "config.json")))["train"]["tensorboard"] is True
