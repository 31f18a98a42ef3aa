"""Fault suite of the trainer: processes killed at random steps and during a snapshot write, a corrupt newest
state, a full disk, non-finite losses, and two trainers on one run directory.

Every case compares with an uninterrupted reference run of the same toy configuration, bit for bit. The
kill points are drawn from a seeded generator, so the suite is the same on every run (about 10 s on 2 cores).
"""

import contextlib
import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Iterator

import pytest
import torch
import torch.multiprocessing as mp

from pid.errors import CheckpointError
from pid.training import read_student_checkpoint, train
from pid.training import checkpoint as ckpt
from pid.training.lock import RunDirBusy, RunDirLock
from test_training import assert_same_tensors, final_state, learned_state
from training_helpers import ToyMethod, ToyStudent, run_toy, toy_config

STEPS = 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_STEPS = sorted(random.Random(16).sample(range(1, STEPS), 3))   # seeded: the same 3 steps on every run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted toy run of STEPS steps (one thread: bit-exact CPU results need equal thread counts)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = train(toy_config(str(tmp_path_factory.mktemp("ref")), steps=STEPS), ToyMethod(), ToyStudent())
    yield run_dir
    torch.set_num_threads(before)


def _assert_same_outcome(run_dir: str, reference: str) -> None:
    """Same weights, EMAs, optimizer state and exported student as the reference; one stats row per step."""
    assert_same_tensors(learned_state(final_state(run_dir)), learned_state(final_state(reference)))
    assert_same_tensors(read_student_checkpoint(ckpt.student_path(run_dir, STEPS))["emas"],
                        read_student_checkpoint(ckpt.student_path(reference, STEPS))["emas"])
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, STEPS + 1)), steps   # log_every=1: no step lost, none repeated


@contextlib.contextmanager
def _forked(target, *args) -> Iterator:
    """A forked child running target(*args) (it reuses the imported modules; a fresh interpreter costs
    seconds on 2 busy cores), SIGKILLed on the way out even when the test fails, so pytest never hangs."""
    proc = mp.get_context("fork").Process(target=target, args=args)
    proc.start()
    try:
        yield proc
    finally:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join()


def _wait_for(marker: str, proc) -> None:
    deadline = time.time() + 120
    while not os.path.exists(marker):
        assert proc.is_alive(), f"the child exited early (code {proc.exitcode})"
        assert time.time() < deadline, "the child never reached the kill point"
        time.sleep(0.02)


def _kill_when(marker: str, proc) -> None:
    _wait_for(marker, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL


def _resume(outdir: str) -> str:
    return train(toy_config(outdir, steps=STEPS, resume="auto"), ToyMethod(), ToyStudent())


@pytest.mark.parametrize("kill_step", KILL_STEPS)
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, reference, kill_step):
    outdir, marker = str(tmp_path), str(tmp_path / "hanging")
    with _forked(run_toy, outdir, STEPS, kill_step, marker) as proc:
        _kill_when(marker, proc)
    _assert_same_outcome(_resume(outdir), reference)


def _hanging_snapshot_child(outdir: str, marker: str) -> None:
    """Train, and hang half-way through writing the second snapshot's training state (to be killed)."""
    real_save, calls = ckpt.torch.save, []

    def save(obj, f):
        calls.append(1)
        if len(calls) == 4:   # student-2, state-2, student-4, then state-4: half written, then hang
            f.write(b"PK\x03\x04 half a zip")
            f.flush()
            open(marker, "w").close()
            while True:
                time.sleep(1)
        real_save(obj, f)

    ckpt.torch.save = save
    run_toy(outdir, STEPS)


def test_sigkill_during_a_snapshot_write_then_resume_is_bit_identical(tmp_path, reference):
    outdir, marker = str(tmp_path), str(tmp_path / "hanging")
    with _forked(_hanging_snapshot_child, outdir, marker) as proc:
        _kill_when(marker, proc)
    run_dir = glob.glob(os.path.join(outdir, "0*"))[0]
    assert sorted(ckpt.list_states(run_dir)) == [2]   # the half-written state never took the real name
    _assert_same_outcome(_resume(outdir), reference)


def test_corrupt_newest_state_falls_back_to_the_previous_one(tmp_path, reference):
    torch.set_num_threads(1)
    run_dir = train(toy_config(str(tmp_path), steps=6, keep_states=0), ToyMethod(), ToyStudent())
    newest = ckpt.state_path(run_dir, 6)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.warns(UserWarning, match="skipping unusable training state"):
        _assert_same_outcome(_resume(str(tmp_path)), reference)


def test_full_disk_stops_cleanly_and_keeps_the_previous_snapshot(tmp_path, reference, monkeypatch):
    """An injected ENOSPC on the second snapshot: one CheckpointError, logged, older files intact."""
    torch.set_num_threads(1)
    real_save, calls = ckpt.torch.save, []

    def save(obj, f):
        calls.append(1)
        if len(calls) == 3:   # student-4 (after student-2 and state-2)
            f.write(b"some bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", save)
    with pytest.raises(CheckpointError, match=r"could not write .*student-0000004.pt \(No space left"):
        train(toy_config(str(tmp_path), steps=STEPS), ToyMethod(), ToyStudent())
    run_dir = glob.glob(os.path.join(str(tmp_path), "0*"))[0]
    assert sorted(os.listdir(run_dir)) == sorted(["config.json", "log.txt", "stats.jsonl", "run.lock", "report.png",
                                                  "student-0000002.pt", "training-state-0000002.pt"])
    assert "ERROR: snapshot at step 4 failed" in open(os.path.join(run_dir, "log.txt")).read()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    _assert_same_outcome(_resume(str(tmp_path)), reference)   # the lock was released; space is back


def test_full_disk_under_a_file_size_limit_is_one_error_line(tmp_path):
    """The real thing without mounting a small disk: RLIMIT_FSIZE makes the snapshot's write fail (EFBIG)."""
    script = ("import os, resource, signal, sys, torch\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"   # write() then fails with EFBIG instead
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
              "torch.set_num_threads(1)\n"
              "sys.path.insert(0, 'tests')\n"
              "from pid.cli import user_errors\n"
              "from training_helpers import ToyMethod, ToyStudent, toy_config\n"
              "from pid.training import train\n"
              "import click\n"
              "cmd = click.command()(user_errors(lambda: train(toy_config(os.environ['FAULT_OUTDIR'], steps=4), "
              "ToyMethod(), ToyStudent(width=256))))\n"
              "cmd()\n")
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "FAULT_OUTDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "could not write" in errors[0] and "student-0000002.pt" in errors[0], errors
    run_dir = glob.glob(os.path.join(str(tmp_path), "0*"))[0]
    assert not [n for n in os.listdir(run_dir) if n.endswith(".pt") or ".tmp-" in n]


class _NonFiniteAt(ToyMethod):
    """The toy method whose loss is NaN, +Inf or -Inf in the given calls."""

    def __init__(self, bad_calls: dict):
        super().__init__()
        self.bad_calls = bad_calls

    def loss(self, *args):
        losses, stats = super().loss(*args)
        bad = self.bad_calls.get(self.calls - 1)
        return (losses * 0 + bad if bad is not None else losses), stats


def test_non_finite_losses_skip_those_steps_only(tmp_path):
    torch.set_num_threads(1)
    bad = {1: float("nan"), 2: float("inf"), 5: float("-inf")}   # one call per step (no accumulation)
    run_dir = train(toy_config(str(tmp_path / "bad"), steps=STEPS), _NonFiniteAt(bad), ToyStudent())
    with open(os.path.join(run_dir, "stats.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r["skipped"]] == [2, 3, 6] and rows[-1]["nan_skipped_total"] == 3
    state = final_state(run_dir)
    assert state["nan_skipped"] == 3 and state["step"] == STEPS
    assert all(torch.isfinite(t).all() for t in state["student"].values())
    for ema in read_student_checkpoint(ckpt.student_path(run_dir, STEPS))["emas"].values():
        assert all(torch.isfinite(t).all() for t in ema.values())


def _hold_lock(run_dir: str, marker: str) -> None:
    lock = RunDirLock(run_dir).acquire()   # noqa: F841 - held until this process is killed
    open(marker, "w").close()
    while True:
        time.sleep(1)


def test_two_trainers_on_one_run_directory(tmp_path, reference):
    """A second trainer is refused while the first lives; a SIGKILLed owner leaves no stale lock."""
    torch.set_num_threads(1)
    outdir, marker = str(tmp_path), str(tmp_path / "hanging")
    with _forked(run_toy, outdir, STEPS, 5, marker) as proc:
        _wait_for(marker, proc)
        with pytest.raises(RunDirBusy, match=f"in use by another trainer \\(pid {proc.pid} on"):
            _resume(outdir)
        run_dir = glob.glob(os.path.join(outdir, "0*"))[0]
        with open(os.path.join(run_dir, "stats.jsonl")) as f:
            assert [json.loads(line)["step"] for line in f] == list(range(1, 6))   # the second wrote nothing
    _assert_same_outcome(_resume(outdir), reference)


def test_lock_of_a_killed_process_is_free(tmp_path):
    marker = str(tmp_path / "locked")
    with _forked(_hold_lock, str(tmp_path), marker) as proc:
        _wait_for(marker, proc)
        with pytest.raises(RunDirBusy, match=str(tmp_path)):
            RunDirLock(str(tmp_path)).acquire()
        _kill_when(marker, proc)
    RunDirLock(str(tmp_path)).acquire().release()


def test_interrupted_run_is_flagged_and_the_cli_exits_130(tmp_path, monkeypatch):
    class Terminating(ToyMethod):
        def loss(self, *args):
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().loss(*args)

    result = train(toy_config(str(tmp_path), steps=10, snap=100), Terminating(), ToyStudent())
    assert result.interrupted and result.step == 3
    finished = train(toy_config(str(tmp_path), steps=10, snap=100, resume="auto"), ToyMethod(), ToyStudent())
    assert not finished.interrupted and finished == result
    from click.testing import CliRunner
    import pid.training
    import train_pid
    monkeypatch.setattr(train_pid, "build_run", lambda opts: (toy_config(str(tmp_path)), None, None, None, None))
    monkeypatch.setattr(pid.training, "train", lambda *a, **k: result)
    cli = CliRunner().invoke(train_pid.main, ["--outdir", str(tmp_path)])
    assert cli.exit_code == 130 and "interrupted at step 3" in cli.output
