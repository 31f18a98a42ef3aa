"""`train()`: set up processes and the run directory, resume if asked, run the loop."""

import gc
import json
import os
import platform
import warnings
from typing import Callable, Dict, Optional, Union

import torch

from pid.errors import PidError
from pid.training import distributed as D
from pid.training.config import TrainConfig
from pid.training.lock import lock_run_dir
from pid.training.loop import Trainer
from pid.training.method import Method
from pid.training.rundir import CONFIG_FILE, new_run_dir, resolve_resume
from pid.training.tracking import require_tensorboard

__all__ = ["train", "make_run_config", "TrainResult", "cpu_has_bf16", "warn_slow_precision"]


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> Optional[bool]:
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16); None if unknown.

    Without such units torch emulates bf16 on the CPU, which made a step many times slower than fp32."""
    try:
        with open(cpuinfo) as f:
            text = f.read()
    except OSError:
        return None   # not Linux: cannot tell
    flags = {word for line in text.splitlines() if line.lower().startswith(("flags", "features"))
             for word in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_slow_precision(precision: str, device: torch.device) -> None:
    """Warn when --precision=bf16 runs on a CPU known to lack bf16 units (it is then many times slower)."""
    if precision == "bf16" and device.type == "cpu" and cpu_has_bf16() is False:
        warnings.warn("--precision=bf16 on a CPU without bfloat16 units (no avx512_bf16/amx_bf16/bf16 flag in "
                      "/proc/cpuinfo): torch emulates bf16 there, and a step is many times slower than in fp32; "
                      "use --precision=fp32 on this machine", stacklevel=2)


class TrainResult(str):
    """What `train()` returns: the run directory (a str), plus whether a signal stopped the run early.

    `interrupted` is True when SIGINT/SIGTERM stopped training before `config.steps` (a state was saved);
    `step` is the number of optimizer steps done.
    """

    interrupted: bool = False
    step: int = 0

    def __new__(cls, run_dir: str, interrupted: bool = False, step: int = 0) -> "TrainResult":
        out = super().__new__(cls, run_dir)
        out.interrupted, out.step = interrupted, step
        return out

    def __reduce__(self) -> tuple:   # copies and pickles (e.g. of a config holding it) are plain paths
        return str, (str(self),)


def make_run_config(config: TrainConfig, method: Method, extra_config: Optional[dict]) -> dict:
    """What config.json holds: the trainer's fields, the method's settings and the caller's extra fields."""
    return json.loads(json.dumps({"train": config.to_dict(),
                                  "method": {"name": method.name, **method.config_dict()},
                                  "extra": extra_config or {}}))


def _decide_run(config: TrainConfig, run_config: dict, dist: D.DistInfo):
    """Main process picks the run directory (new or resumed), locks it and tells the others; errors reach every
    rank. Returns (run_dir, state path or None, state or None, the main process's lock or None)."""
    decision, state, failure, lock = None, None, None, None
    if dist.is_main:
        try:
            run_dir, path, state = resolve_resume(config.resume, config.outdir, run_config)
            if run_dir is None:
                run_dir = new_run_dir(config.outdir, config.desc)
            lock = lock_run_dir(run_dir)   # one owner at a time: a second trainer here stops with RunDirBusy
            decision = ("ok", os.path.abspath(run_dir), path)
        except PidError as exc:
            decision = ("error", type(exc), str(exc))
        except Exception as exc:  # e.g. an unwritable outdir: the others must not wait for rank 0 forever
            decision, failure = ("crash", None, f"{type(exc).__name__}: {exc}"), exc
    decision = D.broadcast_object(decision)
    if failure is not None:
        raise failure
    if decision[0] == "error":
        raise decision[1](decision[2])
    if decision[0] == "crash":
        raise RuntimeError(f"rank 0 could not set up the run directory ({decision[2]})")
    _, run_dir, path = decision
    if path is not None and state is None:   # other ranks read the state the main process chose
        from pid.training.checkpoint import read_training_state
        state = read_training_state(path)
    return run_dir, path, state, lock


def _write_config(run_dir: str, run_config: dict, dist: D.DistInfo) -> None:
    runtime = {"world_size": dist.world_size, "device": str(dist.device), "torch": torch.__version__,
               "python": platform.python_version()}
    with open(os.path.join(run_dir, CONFIG_FILE), "w") as f:
        json.dump({**run_config, "runtime": runtime}, f, indent=2)


def train(config: TrainConfig, method: Method, student: Union[torch.nn.Module, Dict[str, torch.nn.Module]], *,
          extra_config: Optional[dict] = None, evaluate: Optional[Callable[[torch.nn.Module], dict]] = None) -> str:
    """Train `student` with `method` as `config` says; returns the run directory.

    `student` is one module, or `{name: module}` for a method that trains several networks (it then defines
    `phase(step)`, `export` and `ema_networks`, and its `loss` takes the dict and a `MicroBatch`; see loop.py).

    Runs in one process, or in each process started by torchrun (RANK/WORLD_SIZE/LOCAL_RANK set; NCCL on
    CUDA, gloo on CPU); a process group the caller created first is used as is. `evaluate(default_ema_student)
    -> {'metrics': {...}, 'primary': name, 'mode': 'min'|'max'}` runs on every process every `eval_every`
    steps (a distributed evaluator such as `pid.metrics.evaluate.make_evaluator` splits its seeds across them).
    SIGINT/SIGTERM save a training state and return normally with `.interrupted` set (see TrainResult). The
    main process holds the run directory's lock (pid.training.lock) while it trains. Raises ConfigError for
    inconsistent options, a resume of another configuration, or a run directory another live trainer owns
    (RunDirBusy), and for `tensorboard=True` without the tensorboard package.
    """
    dist = D.init_distributed(config.device)
    lock = trainer = None
    try:
        config.validate(dist.world_size)
        if config.tensorboard:
            require_tensorboard()   # before a run directory exists
        if dist.is_main:
            warn_slow_precision(config.precision, dist.device)
        run_config = make_run_config(config, method, extra_config)
        run_dir, path, state, lock = _decide_run(config, run_config, dist)
        trainer = Trainer(config, method, student, dist, run_dir, run_config, evaluate)
        if state is not None:
            trainer.load_training_state(state)
            del state
        elif dist.is_main:
            _write_config(run_dir, run_config, dist)
        D.barrier()
        trainer.run(fresh=path is None)
        result = TrainResult(run_dir, trainer.step < config.steps, trainer.step)
        D.barrier()   # every process leaves together: no peer is still in a collective when the group goes
        return result
    finally:
        if lock is not None:
            lock.release()
        # The DDP wrapper holds the process group and gloo's pending work: free it while the interpreter is
        # alive, before the group is destroyed. Left to interpreter exit, gloo's worker threads can abort the
        # process ("terminate called without an active exception", seen under torchrun on a loaded CPU box).
        trainer = None
        gc.collect()
        dist.shutdown()
