"""Tests of the generic trainer with a toy method and student (tests/training_helpers.py)."""

import glob
import json
import os
import signal
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from pid.errors import CheckpointError, ConfigError
from pid.training import (TrainConfig, is_student_checkpoint, load_latest_state, read_student_checkpoint, train,
                          write_student_checkpoint)
from pid.training import checkpoint as ckpt
from pid.training.ema import EMAs
from pid.training.optim import lr_at
from training_helpers import ToyMethod, ToyStudent, ddp_worker, ddp_worker_reporting, run_toy, toy_config


def final_state(run_dir: str) -> dict:
    path, state = load_latest_state(run_dir)
    return state


def assert_same_tensors(a, b, exact=True):
    """Recursively compare nested dicts/lists of tensors and numbers."""
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same_tensors(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y, exact)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-7), (a, b)
    else:
        assert a == b


def learned_state(state: dict) -> dict:
    """What training changes: weights, EMAs and optimizer state."""
    return {"student": state["student"], "emas": state["emas"], "optimizer": state["optimizer"]["state"],
            "step": state["step"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("grad_sync,compile,wrapper", [("ddp", False, "_DDP"), ("manual", False, "ToyStudent"),
                                                      ("ddp", True, "OptimizedModule")])
def test_two_process_step_equals_single_process_step(tmp_path, monkeypatch, grad_sync, compile, wrapper):
    from pid.training import fast
    monkeypatch.setattr(fast, "COMPILE_OPTIONS", {"backend": "eager"})   # the forked children inherit it
    overrides = dict(steps=2, batch=8, batch_gpu=2, snap=2)
    single = train(toy_config(str(tmp_path / "single"), **overrides), ToyMethod(), ToyStudent())
    # fork: the children reuse the imported modules (spawn would re-import torch, ~10 s on 2 busy cores)
    types = str(tmp_path / "types.txt")
    more = {"grad_sync": grad_sync, "compile": compile}
    mp.start_processes(ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), {**overrides, **more}, types),
                       nprocs=2, join=True, start_method="fork")
    # DDP (no_sync in the first of 2 rounds), the manual all-reduce, or torch.compile of the DDP wrapper
    assert open(types).read() == wrapper
    ddp_run = glob.glob(str(tmp_path / "ddp" / "*"))
    assert len(ddp_run) == 1, "both ranks must share one run directory"
    a, b = final_state(single), final_state(ddp_run[0])
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert not torch.equal(a["student"]["net.0.weight"], ToyStudent().state_dict()["net.0.weight"])
    # Same micro-batches (slots 0..3) in both; only the order of the gradient sum differs.
    assert_same_tensors(learned_state(a), learned_state(b), exact=False)


def test_two_process_ddp_resume_is_exact(tmp_path):
    """Under DDP, 2 processes that stop after 2 steps and resume to 4 end bit-identical to 2 processes running 4."""
    def run(outdir, **overrides):
        mp.start_processes(ddp_worker, args=(2, free_port(), outdir, dict(batch=8, batch_gpu=2, snap=2, **overrides)),
                           nprocs=2, join=True, start_method="fork")
    run(str(tmp_path / "full"), steps=4)
    run(str(tmp_path / "parts"), steps=2)
    run(str(tmp_path / "parts"), steps=4, resume="auto")
    (full,), (parts,) = glob.glob(str(tmp_path / "full" / "*")), glob.glob(str(tmp_path / "parts" / "*"))
    a, b = final_state(full), final_state(parts)
    assert a["step"] == b["step"] == 4
    assert_same_tensors(learned_state(a), learned_state(b))


@pytest.mark.parametrize("bad", [{"batch": 7}, {"lr": 0.02, "resume": "auto"}])
def test_two_process_errors_reach_every_rank(tmp_path, bad):
    # Every rank must raise (a rank left waiting in a collective would hang the job until its timeout).
    outdir = str(tmp_path)
    train(toy_config(outdir, steps=1, batch=8), ToyMethod(), ToyStudent())
    port, reports = free_port(), str(tmp_path / "report")
    procs = [mp.get_context("fork").Process(target=ddp_worker_reporting,
                                            args=(rank, 2, port, outdir, {"steps": 1, "batch": 8, **bad}, reports))
             for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank did not finish"
    for rank in range(2):
        assert open(f"{reports}-{rank}.txt").read().startswith("ConfigError")


# -------------------------------------------------------------------------------- kill and resume
@pytest.fixture
def one_thread():
    """Bit-exact CPU results need the same intra-op thread count in every run (the killed child uses 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sigkill_then_resume_auto_matches_uninterrupted_run(tmp_path, one_thread):
    steps = 6
    reference = train(toy_config(str(tmp_path / "ref"), steps=steps), ToyMethod(), ToyStudent())
    outdir, marker = str(tmp_path / "killed"), str(tmp_path / "hanging")
    # A forked child (it reuses the imported modules; a fresh interpreter costs ~10 s on 2 busy cores).
    proc = mp.get_context("fork").Process(target=run_toy, args=(outdir, steps, 5, marker))
    proc.start()
    deadline = time.time() + 120
    while not os.path.exists(marker):
        assert proc.is_alive(), f"the training child exited early (code {proc.exitcode})"
        assert time.time() < deadline, "the training child never reached the hanging step"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    run_dir = glob.glob(os.path.join(outdir, "*"))[0]
    assert sorted(ckpt.list_states(run_dir)) == [2, 4]
    resumed = train(toy_config(outdir, steps=steps, resume="auto"), ToyMethod(), ToyStudent())
    assert resumed == run_dir
    assert_same_tensors(learned_state(final_state(resumed)), learned_state(final_state(reference)))
    ref_student = read_student_checkpoint(ckpt.student_path(reference, steps))
    new_student = read_student_checkpoint(ckpt.student_path(resumed, steps))
    assert_same_tensors(ref_student["emas"], new_student["emas"])


def test_sigterm_saves_state_and_returns(tmp_path):
    class Terminating(ToyMethod):
        def loss(self, *args):
            if self.calls == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().loss(*args)

    handler_before = signal.getsignal(signal.SIGTERM)
    run_dir = train(toy_config(str(tmp_path), steps=10, snap=100), Terminating(), ToyStudent())
    assert sorted(ckpt.list_states(run_dir)) == [3]   # the step in flight finishes, then the state is saved
    assert "stopped by signal at step 3" in open(os.path.join(run_dir, "log.txt")).read()
    assert signal.getsignal(signal.SIGTERM) == handler_before
    train(toy_config(str(tmp_path), steps=10, snap=100, resume="auto"), ToyMethod(), ToyStudent())
    assert sorted(ckpt.list_states(run_dir)) == [3, 10]


def test_resume_refuses_other_configuration(tmp_path):
    run_dir = train(toy_config(str(tmp_path), steps=2), ToyMethod(), ToyStudent())
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.01 -> 0\.02"):
        train(toy_config(str(tmp_path), steps=2, lr=0.02, resume="auto"), ToyMethod(), ToyStudent())
    with pytest.raises(ConfigError, match="different configuration"):
        train(toy_config(str(tmp_path), steps=2, batch=4, resume=run_dir), ToyMethod(), ToyStudent())

    class OtherMethod(ToyMethod):
        def config_dict(self):
            return {"target": "something else"}

    with pytest.raises(ConfigError, match="method.target"):
        train(toy_config(str(tmp_path), steps=2, resume="auto"), OtherMethod(), ToyStudent())
    # Extending a constant-LR run is allowed and continues the same directory.
    assert train(toy_config(str(tmp_path), steps=3, resume="auto"), ToyMethod(), ToyStudent()) == run_dir
    with pytest.raises(CheckpointError, match="no usable training-state"):
        train(toy_config(str(tmp_path), resume=str(tmp_path)), ToyMethod(), ToyStudent())


def test_runs_written_before_a_setting_existed_resume_when_it_cannot_matter():
    """A run's config.json from before `lpips_pool`/`residual_precision`/`mixture_adjust` existed implies the old
    behaviour: it resumes when that behaviour cannot change its trajectory, and is refused, naming the setting,
    when it does."""
    from pid.training.rundir import config_differences

    def pid_run(loss, precision, **new):
        extra = {"pid": {"loss": loss, **new}}
        method = {"name": "pid", "distance": {"name": loss, **({"lpips_pool": new["lpips_pool"]} if new else {})},
                  **({"residual_precision": new["residual_precision"]} if new else {})}
        return {"train": {"precision": precision}, "method": method, "extra": extra}

    now = {"lpips_pool": "avg", "residual_precision": "fp32"}
    assert config_differences(pid_run("l2", "fp32"), pid_run("l2", "fp32", **now)) == []
    diffs = config_differences(pid_run("lpips", "fp32"), pid_run("lpips", "fp32", **now))
    assert diffs and all("lpips_pool: 'max' -> 'avg'" in d for d in diffs)
    assert config_differences(pid_run("lpips", "fp32"), pid_run("lpips", "fp32", lpips_pool="max",
                                                                 residual_precision="fp32")) == []
    assert any("residual_precision: 'amp' -> 'fp32'" in d
               for d in config_differences(pid_run("l2", "fp16"), pid_run("l2", "fp16", **now)))

    def mm_run(kind, **new):
        return {"train": {"precision": "fp32"}, "method": {"name": "mm"},
                "extra": {"mm": {"k": 4, **new}, "student": {"denoiser": {"kind": kind, **(
                    {"adjust": None if kind == "edm" else {"components": 30}} if new else {})}}}}

    assert config_differences(mm_run("edm"), mm_run("edm", mixture_adjust=True)) == []
    assert any("mixture_adjust: False -> True" in d
               for d in config_differences(mm_run("mixture-residual"), mm_run("mixture-residual", mixture_adjust=True)))


def test_latest_state_skips_a_damaged_file(tmp_path):
    run_dir = train(toy_config(str(tmp_path), steps=4, keep_states=0), ToyMethod(), ToyStudent())
    newest = ckpt.state_path(run_dir, 4)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    with pytest.warns(UserWarning, match="skipping unusable"):
        path, state = load_latest_state(run_dir)
    assert path == ckpt.state_path(run_dir, 2) and state["step"] == 2


# ------------------------------------------------------------------------------- precision, NaN
@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_mixed_precision_runs_on_cpu(tmp_path, precision, dtype):
    method = ToyMethod()
    run_dir = train(toy_config(str(tmp_path), steps=3, precision=precision), method, ToyStudent())
    assert dtype in method.output_dtypes, "the method must run under autocast"
    state = final_state(run_dir)
    weights = state["student"]["net.0.weight"]
    assert weights.dtype == torch.float32 and torch.isfinite(weights).all()
    assert not torch.equal(weights, ToyStudent().state_dict()["net.0.weight"])
    stats = [json.loads(line) for line in open(os.path.join(run_dir, "stats.jsonl"))]
    assert len(stats) == 3 and all(s["loss"] is not None for s in stats)
    assert ("loss_scale" in stats[-1]) == (precision == "fp16")
    assert bool(state["scaler"]) == (precision == "fp16")


def test_bf16_on_a_cpu_without_bf16_units_warns(tmp_path, monkeypatch):
    import warnings
    from pid.training import entry
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert entry.cpu_has_bf16(str(info)) is False
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert entry.cpu_has_bf16(str(info)) is True
    info.write_text("Features\t: fp asimd sve bf16\n")   # Arm
    assert entry.cpu_has_bf16(str(info)) is True
    assert entry.cpu_has_bf16(str(tmp_path / "missing")) is None   # not Linux: unknown, no warning
    monkeypatch.setattr(entry, "cpu_has_bf16", lambda: False)
    with pytest.warns(UserWarning, match="bf16 on a CPU without bfloat16 units.*many times slower"):
        entry.warn_slow_precision("bf16", torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry.warn_slow_precision("fp32", torch.device("cpu"))
        entry.warn_slow_precision("bf16", torch.device("meta"))   # not a CPU
        monkeypatch.setattr(entry, "cpu_has_bf16", lambda: None)
        entry.warn_slow_precision("bf16", torch.device("cpu"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nan_step_is_skipped_without_side_effects(tmp_path, precision):
    # Step index 2 produces NaN: the run's state after 3 steps must equal a clean run stopped after 2.
    skipped = train(toy_config(str(tmp_path / "nan"), steps=3, precision=precision), ToyMethod(nan_at_call=2),
                    ToyStudent())
    clean = train(toy_config(str(tmp_path / "clean"), steps=2, precision=precision), ToyMethod(), ToyStudent())
    a, b = final_state(skipped), final_state(clean)
    assert a["step"] == 3 and a["nan_skipped"] == 1
    assert_same_tensors({k: v for k, v in learned_state(a).items() if k != "step"},
                        {k: v for k, v in learned_state(b).items() if k != "step"})
    stats = [json.loads(line) for line in open(os.path.join(skipped, "stats.jsonl"))]
    assert stats[2]["skipped"] is True and stats[2]["loss"] is None and stats[2]["nan_skipped_total"] == 1
    if precision == "fp16":
        assert stats[2]["loss_scale"] == stats[1]["loss_scale"] / 2
    assert "step skipped" in open(os.path.join(skipped, "log.txt")).read()


# ----------------------------------------------------------------------------------- checkpoints
def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = str(tmp_path / "student.pt")
    sd = {"w": torch.arange(4.0)}
    write_student_checkpoint(path, {"class": "X"}, {"0.9": sd}, "0.9", step=1)
    before = open(path, "rb").read()

    def failing_save(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(CheckpointError, match=r"could not write .*student.pt \(disk full; .*intact"):
        write_student_checkpoint(path, {"class": "X"}, {"0.9": {"w": torch.zeros(4)}}, "0.9", step=2)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["student.pt"]
    with pytest.raises(CheckpointError):
        write_student_checkpoint(str(tmp_path / "new.pt"), {}, {"0.9": sd}, "0.9", step=1)
    assert os.listdir(tmp_path) == ["student.pt"]


def test_student_checkpoint_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "s.pt")
    emas = {"0.999": {"w": torch.randn(3)}, "raw": {"w": torch.randn(3)}}
    write_student_checkpoint(path, {"class": "ToyStudent", "width": 4}, emas, "0.999", step=7, extra={"note": "x"})
    data = torch.load(path, weights_only=True)
    assert data["format"] == "pid-student" and data["version"] == 1 and data["step"] == 7
    assert data["spec"]["width"] == 4 and data["note"] == "x" and data["default_ema"] == "0.999"
    assert torch.equal(read_student_checkpoint(path)["emas"]["raw"]["w"], emas["raw"]["w"])
    assert is_student_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_student_checkpoint(str(tmp_path / "missing.pt"))
    truncated = str(tmp_path / "t.pt")
    open(truncated, "wb").write(open(path, "rb").read()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_student_checkpoint(truncated)
    other = str(tmp_path / "o.pt")
    torch.save({"format": "something"}, other)
    with pytest.raises(CheckpointError, match="not a student checkpoint"):
        read_student_checkpoint(other)
    torch.save({"format": "pid-student", "version": 99}, other)
    with pytest.raises(CheckpointError, match="version 99"):
        read_student_checkpoint(other)
    assert not is_student_checkpoint(truncated)


def test_run_directory_contents(tmp_path):
    calls = []

    def evaluate(student):
        calls.append(student.training)
        return {"metrics": {"fid": [5.0, 3.0, 4.0][len(calls) - 1]}, "primary": "fid", "mode": "min"}

    run_dir = train(toy_config(str(tmp_path), steps=6, snap=2, grid_every=3, grid_seeds=4, eval_every=2),
                    ToyMethod(), ToyStudent(), extra_config={"teacher": "toy"}, evaluate=evaluate)
    names = set(os.listdir(run_dir))
    assert {"config.json", "log.txt", "stats.jsonl", "metrics.jsonl", "student-best.pt", "student-0000006.pt",
            "samples-0000000.png", "samples-0000003.png", "samples-0000006.png"} <= names
    assert sorted(ckpt.list_states(run_dir)) == [4, 6]   # keep_states=2 pruned step 2
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["extra"] == {"teacher": "toy"} and config["method"]["name"] == "toy"
    assert config["train"]["batch"] == 8 and config["runtime"]["world_size"] == 1
    metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [2, 4, 6] and calls == [False] * 3
    best = read_student_checkpoint(os.path.join(run_dir, "student-best.pt"))
    assert best["step"] == 4 and best["best"]["value"] == 3.0
    final = read_student_checkpoint(os.path.join(run_dir, "student-0000006.pt"))
    assert set(final["emas"]) == {"0.9"} and final["default_ema"] == "0.9"   # --snap-emas=default
    assert set(best["emas"]) == {"0.9"}
    assert final["spec"] == {"class": "ToyStudent", "width": 4}
    assert all(not k.startswith(".") for k in names), "no temporary files left behind"


def test_student_snapshots_hold_all_emas_on_request_and_old_ones_are_pruned(tmp_path):
    """A student snapshot is a full network per EMA (a CIFAR-10 run with 3 EMAs and 80 snapshots wrote ~54 GB):
    by default it holds the default EMA only; --snap-emas=all writes them all; --keep-students=K keeps the
    newest K snapshots (student-best.pt is never pruned)."""
    run_dir = train(toy_config(str(tmp_path / "all"), steps=6, snap=2, snap_emas="all", keep_students=2,
                               keep_states=0), ToyMethod(), ToyStudent())
    assert sorted(ckpt.list_students(run_dir)) == [4, 6] and sorted(ckpt.list_states(run_dir)) == [2, 4, 6]
    final = read_student_checkpoint(ckpt.student_path(run_dir, 6))
    assert set(final["emas"]) == {"0.5", "0.9"} and final["default_ema"] == "0.9"
    torch.testing.assert_close(final["emas"]["0.5"], final_state(run_dir)["emas"]["0.5"])
    run_dir = train(toy_config(str(tmp_path / "raw"), steps=4, snap=1, default_ema=None), ToyMethod(), ToyStudent())
    assert sorted(ckpt.list_students(run_dir)) == [1, 2, 3, 4]   # keep_students=0: all kept
    assert list(read_student_checkpoint(ckpt.student_path(run_dir, 4))["emas"]) == ["raw"]
    with pytest.raises(ConfigError, match="--snap-emas"):
        toy_config(str(tmp_path), snap_emas="some").validate()
    with pytest.raises(ConfigError, match="--keep-students"):
        toy_config(str(tmp_path), keep_students=-1).validate()


# ------------------------------------------------------------------------------- config, EMA, LR
def test_config_errors():
    with pytest.raises(ConfigError, match="not divisible by the number of processes"):
        TrainConfig(batch=10).validate(world_size=4)
    with pytest.raises(ConfigError, match="--batch-gpu=3"):
        TrainConfig(batch=8, batch_gpu=3).validate(world_size=2)
    with pytest.raises(ConfigError, match="--optimizer"):
        TrainConfig(optimizer="sgd").validate()
    with pytest.raises(ConfigError, match="--precision"):
        TrainConfig(precision="fp8").validate()
    with pytest.raises(ConfigError, match="--default-ema"):
        TrainConfig(ema=(0.9,), default_ema=0.99).validate()
    cfg = TrainConfig(batch=16, batch_gpu=2)
    cfg.validate(world_size=2)
    assert (cfg.micro_batch(2), cfg.accum_rounds(2)) == (2, 4)


def test_ema_follows_the_formula():
    student = ToyStudent()
    emas = EMAs(student, (0.5, 0.9))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student.calls.fill_(7)
        student.running.fill_(3.0)
    emas.update(student)
    for name, beta in (("0.5", 0.5), ("0.9", 0.9)):
        w = emas.states[name]["net.0.weight"]
        assert torch.allclose(w, beta * start["net.0.weight"] + (1 - beta) * (start["net.0.weight"] + 1))
        assert emas.states[name]["calls"].item() == 7 and emas.states[name]["running"].tolist() == [3.0, 3.0]


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, steps=10, warmup=4, lr_schedule="linear")
    values = [lr_at(s, cfg) for s in range(10)]
    assert values[0] == pytest.approx(0.25) and values[3] == pytest.approx(0.7)
    assert values[9] == pytest.approx(0.1) and all(v > 0 for v in values)
    assert all(lr_at(s, TrainConfig(lr=0.5)) == 0.5 for s in (0, 5, 999))


def test_raw_weights_only_when_no_ema(tmp_path):
    run_dir = train(toy_config(str(tmp_path), steps=2, ema=(), default_ema=None), ToyMethod(), ToyStudent())
    student = read_student_checkpoint(ckpt.student_path(run_dir, 2))
    assert list(student["emas"]) == ["raw"] and student["default_ema"] == "raw"
    assert_same_tensors(student["emas"]["raw"], final_state(run_dir)["student"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_cuda_paths(tmp_path, precision):
    method = ToyMethod(nan_at_call=1)
    run_dir = train(toy_config(str(tmp_path), steps=3, precision=precision, device="cuda", grid_every=3,
                               grid_seeds=4), method, ToyStudent())
    state = final_state(run_dir)
    assert state["nan_skipped"] == 1 and torch.isfinite(state["student"]["net.0.weight"]).all()
    assert "cuda" in state["rng"][0]
    assert os.path.exists(os.path.join(run_dir, "samples-0000003.png"))


def test_compile_option_keeps_checkpoints_and_results(tmp_path, monkeypatch):
    """--compile: the method calls the compiled network, checkpoints keep their keys, grids run eagerly. The
    'eager' backend exercises dynamo's capture without a C++ compiler; inductor's kernels are for the GPU check."""
    from pid.training import fast
    monkeypatch.setattr(fast, "COMPILE_OPTIONS", {"backend": "eager"})
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = train(toy_config(str(tmp_path / "c"), steps=2, compile=True, grid_every=2, grid_seeds=4),
                     ToyMethod(), ToyStudent())
    plain = train(toy_config(str(tmp_path / "p"), steps=2, grid_every=2, grid_seeds=4), ToyMethod(), ToyStudent())
    assert counters["frames"]["ok"] > 0, "dynamo captured nothing"
    a, b = final_state(compiled), final_state(plain)
    assert a["student"].keys() == b["student"].keys()
    assert_same_tensors(learned_state(a), learned_state(b), exact=False)
    assert os.path.exists(os.path.join(compiled, "samples-0000002.png"))


def test_fused_adam_only_on_cuda():
    from pid.training.optim import make_optimizer
    cpu = make_optimizer(ToyStudent().parameters(), TrainConfig(optimizer="adam"))
    assert cpu.defaults["foreach"] and not cpu.defaults.get("fused")
    assert make_optimizer(ToyStudent().parameters(), TrainConfig(optimizer="radam")).defaults["foreach"]
    if torch.cuda.is_available():
        gpu = make_optimizer(ToyStudent().cuda().parameters(), TrainConfig(optimizer="adam"))
        assert gpu.defaults["fused"]
