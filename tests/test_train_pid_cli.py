"""train_pid.py: bad input gives one clear line and a non-zero exit; tiny end-to-end runs (also under torchrun)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from tests.conftest import REPO_ROOT

sys.path.insert(0, REPO_ROOT)
import train_pid  # noqa: E402

TINY = ["--student-preset=tiny", "--teacher=builtin:glyphs16", "--batch=4", "--discretization=8", "--grid-every=0",
        "--eval-every=0", "--log-every=1"]


def run_cli(args):
    result = CliRunner().invoke(train_pid.main, args)
    assert "Traceback" not in result.output
    return result


def assert_user_error(result, *needles):
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # handled, not a crash
    for needle in needles:
        assert needle in result.output, result.output


def test_bad_input_is_a_clear_error(tmp_path):
    out = str(tmp_path / "runs")
    assert_user_error(run_cli([f"--outdir={out}", f"--teacher={tmp_path}/missing.pkl"]), "not found", "missing.pkl")
    corrupt = tmp_path / "corrupt.pkl"
    corrupt.write_bytes(os.urandom(200))
    assert_user_error(run_cli([f"--outdir={out}", f"--teacher={corrupt}", "--device=cpu"]), "corrupt.pkl")
    assert_user_error(run_cli([f"--outdir={out}", "--loss=l3"]), "Invalid value for '--loss'", "lpips")
    assert_user_error(run_cli([f"--outdir={out}", "--preset=cifar100"]), "Invalid value for '--preset'", "cifar10")
    assert_user_error(run_cli([f"--outdir={out}", *TINY, "--steps=1", "--batch=6", "--batch-gpu=4"]),
                      "--batch-gpu=4 does not divide")
    assert_user_error(run_cli([f"--outdir={out}", "--student-preset=huge"]), "unknown student preset 'huge'")
    assert_user_error(run_cli([f"--outdir={out}", "--ema=0.9,x"]), "--ema expects comma-separated numbers")


def test_presets_merge_with_explicit_options():
    result = run_cli(["--preset=imagenet64", "--lr=3e-4", "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = dict(line.split(" = ", 1) for line in result.output.strip().splitlines())
    assert lines["lr"] == "0.0003" and lines["batch"] == "2048" and lines["precision"] == "fp16"
    assert lines["loss"] == "lpips" and lines["discretization"] == "250"
    assert lines["lpips_pool"] == "avg"   # the reference's LPIPS (piq, VGG16 with average pooling)
    assert lines["teacher"].endswith("edm-imagenet-64x64-cond-adm.pkl")
    default = dict(line.split(" = ", 1) for line in run_cli(["--dry-run"]).output.strip().splitlines())
    assert default["teacher"] == "builtin:glyphs16" and default["loss"] in ("l2", "l1", "pseudo-huber")
    # The built-in default spaces its grid for the toy teacher; the reference recipes keep EDM's rho = 7,
    # also when only an EDM teacher is given.
    assert float(lines["rho"]) == 7.0 and float(default["rho"]) != 7.0
    for args in (["--preset=cifar10"], ["--teacher=edm-cifar10-32x32-uncond-vp.pkl"],
                 ["--preset=cifar10", "--rho=3"]):
        merged = dict(line.split(" = ", 1) for line in run_cli([*args, "--dry-run"]).output.strip().splitlines())
        assert float(merged["rho"]) == (3.0 if "--rho=3" in args else 7.0), (args, merged["rho"])
        assert merged["lpips_pool"] == "avg", args
        assert merged["lr_schedule"] == "constant", args   # the reference's constant rate, not the default's decay
    assert lines["lr_schedule"] == "constant" and default["lr_schedule"] == "linear"
    net = dict(line.split(" = ", 1) for line in
               run_cli(["--teacher=builtin:glyphs16-net", "--dry-run"]).output.strip().splitlines())
    assert (net["lr_schedule"], net["steps"], net["lr"]) == ("constant", "1000", "0.001")   # its measured recipe
    maxpool = dict(line.split(" = ", 1) for line in
                   run_cli(["--preset=cifar10", "--lpips-pool=max", "--dry-run"]).output.strip().splitlines())
    assert maxpool["lpips_pool"] == "max"


def test_tiny_run_end_to_end_and_resume_checks(tmp_path):
    from pid.methods.pid.student import load_student
    out = str(tmp_path / "runs")
    result = run_cli([f"--outdir={out}", *TINY, "--steps=2", "--snap=2"])
    assert result.exit_code == 0, result.output
    (run,) = os.listdir(out)
    files = os.listdir(os.path.join(out, run))
    assert {"config.json", "log.txt", "stats.jsonl", "student-0000002.pt"} <= set(files)
    config = json.load(open(os.path.join(out, run, "config.json")))
    assert config["method"]["name"] == "pid" and config["method"]["discretization"] == 8
    student = load_student(os.path.join(out, run, "student-0000002.pt"))
    images = student.generate(torch.randn(3, 3, 16, 16), torch.eye(10)[[0, 4, 9]])
    assert images.shape == (3, 3, 16, 16) and float(images.abs().max()) <= 1
    # Resuming with another configuration is refused with a clear message.
    other = run_cli([f"--outdir={out}", *TINY, "--steps=4", "--resume=auto", "--discretization=9"])
    assert_user_error(other)
    # The default decays the lr to 0 at --steps, so more steps would change the schedule: refused.
    longer = run_cli([f"--outdir={out}", *TINY, "--steps=3", "--snap=1", "--resume=auto"])
    assert_user_error(longer, "train.steps: 2 -> 3", "decays linearly to 0")
    # A constant-lr run continues with more steps.
    out = str(tmp_path / "constant")
    assert run_cli([f"--outdir={out}", *TINY, "--steps=2", "--snap=2", "--lr-schedule=constant"]).exit_code == 0
    (run,) = os.listdir(out)
    again = run_cli([f"--outdir={out}", *TINY, "--steps=3", "--snap=1", "--resume=auto", "--lr-schedule=constant"])
    assert again.exit_code == 0, again.output
    assert os.listdir(out) == [run] and "student-0000003.pt" in os.listdir(os.path.join(out, run))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_runs_on_cpu(tmp_path, precision):
    out = str(tmp_path / "runs")
    result = run_cli([f"--outdir={out}", *TINY, "--steps=1", "--snap=1", f"--precision={precision}"])
    assert result.exit_code == 0, result.output
    (run,) = os.listdir(out)
    stats = [json.loads(line) for line in open(os.path.join(out, run, "stats.jsonl"))]
    assert stats and all(math.isfinite(r["loss"]) for r in stats)


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on CPU")
def test_torchrun_two_processes_on_cpu(tmp_path):
    out = str(tmp_path / "runs")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO_ROOT, "train_pid.py"), f"--outdir={out}", *TINY, "--steps=2", "--snap=2",
           "--device=cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    (run,) = os.listdir(out)
    assert "student-0000002.pt" in os.listdir(os.path.join(out, run))
    bad = subprocess.run(cmd[:-3] + ["--steps=1", "--batch=3", "--device=cpu"], env=env, capture_output=True,
                         text=True, timeout=240, cwd=REPO_ROOT)
    assert bad.returncode != 0 and "not divisible by the number of processes (2)" in bad.stderr + bad.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_preset_without_cuda_stops_unless_device_cpu(tmp_path):
    import train_mm
    out = str(tmp_path / "runs")
    for main, preset in ((train_pid.main, "cifar10"), (train_pid.main, "imagenet64"), (train_mm.main, "imagenet64")):
        result = CliRunner().invoke(main, [f"--outdir={out}", f"--preset={preset}"])
        assert_user_error(result, f"--preset={preset} is sized for CUDA GPUs", "--device=cpu")
        assert result.output.count("Error:") == 1 and len(result.output.strip().splitlines()) == 1
    assert_user_error(run_cli([f"--outdir={out}", *TINY, "--device=cuda"]), "CUDA is not available", "--device=cpu")
    pkl = tmp_path / "edm-teacher.pkl"   # checked before loading: any existing file stands for an EDM pickle
    pkl.write_bytes(b"not read")
    for main in (train_pid.main, train_mm.main):
        result = CliRunner().invoke(main, [f"--outdir={out}", f"--teacher={pkl}"])
        assert_user_error(result, "an EDM teacher takes the real-teacher recipe", "(batch 512)", "--device=cpu")
    assert not os.path.exists(out), "nothing may start before the device check"
    # --dry-run still shows a preset's settings on a laptop
    assert run_cli(["--preset=cifar10", "--dry-run"]).exit_code == 0


def test_fast_path_options_reach_the_config_and_run_on_cpu(tmp_path):
    out = str(tmp_path / "runs")
    fast = ["--student-preset=glyphs16-ddpmpp", "--attention=sdpa", "--channels-last=true"]
    result = run_cli([f"--outdir={out}", *TINY, *fast, "--steps=1", "--snap=1", "--lr-schedule=constant"])
    assert result.exit_code == 0, result.output
    (run,) = os.listdir(out)
    train = json.load(open(os.path.join(out, run, "config.json")))["train"]
    assert (train["attention"], train["channels_last"], train["compile"], train["grad_sync"]) == ("sdpa", True, False,
                                                                                                 "ddp")
    # speed options may change on resume (they change results only by rounding), like --device
    again = run_cli([f"--outdir={out}", *TINY, "--student-preset=glyphs16-ddpmpp", "--steps=2", "--snap=1",
                     "--resume=auto", "--lr-schedule=constant"])
    assert again.exit_code == 0, again.output
    assert os.listdir(out) == [run] and "student-0000002.pt" in os.listdir(os.path.join(out, run))
    assert_user_error(run_cli([f"--outdir={out}", "--attention=flash"]), "Invalid value for '--attention'")


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on CPU")
def test_torchrun_evaluation_is_split_across_ranks(tmp_path):
    """Evaluation during training runs on every rank (seeds split, results gathered) and equals one process's."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [os.path.join(REPO_ROOT, "train_pid.py"), *TINY, "--steps=2", "--snap=2", "--device=cpu",
            "--eval-every=2", "--eval-num=6"]
    metrics = []
    for launcher, extra in (([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                             []), ([sys.executable], ["--batch-gpu=2"])):
        out = str(tmp_path / f"runs{len(metrics)}")
        proc = subprocess.run([*launcher, *args, f"--outdir={out}", *extra], env=env, capture_output=True,
                              text=True, timeout=300, cwd=REPO_ROOT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        (run,) = os.listdir(out)
        (line,) = open(os.path.join(out, run, "metrics.jsonl")).read().splitlines()
        metrics.append(json.loads(line))
    two, one = metrics
    assert two.keys() == one.keys() and two["step"] == 2
    for key in ("rmse", "component_accuracy"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


_NO_DDP_LEFT = """
import gc, runpy, sys
sys.path.insert(0, {root!r})
sys.argv = ["train_pid.py", *{args!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exc:
    assert not exc.code, exc.code
from torch.nn.parallel import DistributedDataParallel
import torch.distributed
alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())   # no gc.collect(): as at exit
print("alive", alive, "group", torch.distributed.is_initialized())
"""


@pytest.mark.skipif(sys.platform == "win32", reason="torchrun with gloo on CPU")
def test_torchrun_frees_ddp_before_the_process_group_goes(tmp_path):
    """After train() returns, no DDP wrapper is left for interpreter exit to free: one left there holds gloo's
    worker threads past destroy_process_group, and CI saw rank 1 abort at exit ("terminate called without an
    active exception") when it was."""
    script = tmp_path / "no_ddp_left.py"
    args = [*TINY, "--steps=2", "--snap=2", "--device=cpu", "--eval-every=2", "--eval-num=6",
            f"--outdir={tmp_path / 'runs'}"]
    script.write_text(_NO_DDP_LEFT.format(root=REPO_ROOT, args=args, script=os.path.join(REPO_ROOT, "train_pid.py")))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("alive")]
    assert lines == ["alive 0 group False"] * 2, proc.stdout[-2000:]
