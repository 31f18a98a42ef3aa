"""Shared helpers for the click front-ends: every user error is one `Error: ...` line and exit status 1, and the
one option→config layer of the training scripts (train_pid.py, train_mm.py): the trainer's options, how a recipe, a
preset and the given options merge, and how they become a `pid.training.TrainConfig`.

Three sources of user errors are covered: our own `PidError`s (and `edm_networks` loading errors) raised by
a command (`user_errors`), click's usage errors raised while parsing the options (`OneLineCommand`,
`OneLineGroup`: click would print the usage, a hint and the error, and exit 2), and operating-system errors
about a file the user named (disk full, read-only folder), which name the path.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Optional, Sequence

import click

from pid.errors import ConfigError, PidError

__all__ = ["user_errors", "OneLineCommand", "OneLineGroup", "EXIT_INTERRUPTED", "check_output_file",
           "check_output_dir", "train_options", "merge_options", "train_config_from", "parse_floats", "TRAIN_FIELDS",
           "echo_options", "limit_threads", "finish_run", "run_training", "training_evaluator", "check_device"]

# Exit status of a run stopped by SIGINT/SIGTERM after saving its state (128 + SIGINT, as shells report ^C).
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def _usage_errors_in_one_line(ctx: Optional[click.Context]) -> Iterator[None]:
    # click's UsageError prints usage + hint + message and exits 2; the README promises one line and exit 1.
    try:
        yield
    except click.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx is not None else (ctx.command_path if ctx else "")
        message = " ".join(exc.format_message().split())
        raise click.ClickException(f"{message} (see '{where} --help')" if where else message) from None


class OneLineCommand(click.Command):
    """A click command whose option-parsing errors are one `Error:` line with exit status 1."""

    def parse_args(self, ctx: click.Context, args: list) -> list:
        with _usage_errors_in_one_line(ctx):
            return super().parse_args(ctx, args)


class OneLineGroup(click.Group):
    """A click group (and its subcommands) whose usage errors are one `Error:` line with exit status 1."""

    command_class = OneLineCommand

    def parse_args(self, ctx: click.Context, args: list) -> list:
        with _usage_errors_in_one_line(ctx):
            return super().parse_args(ctx, args)

    def resolve_command(self, ctx: click.Context, args: list):
        with _usage_errors_in_one_line(ctx):
            return super().resolve_command(ctx, args)


def _os_error_line(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    what = f"cannot access {exc.filename}" if exc.filename else "a file could not be read or written"
    return (f"{what}: {reason}. Check that the path exists and is writable, and that the disk has free "
            f"space")


def user_errors(fn):
    """Decorator for click commands: print a `PidError`, an `edm_networks` loading error or an OSError about a
    named file as one line, exit 1. Anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PidError as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None
        except OSError as exc:
            if exc.filename is None and exc.strerror is None:
                raise
            raise click.ClickException(_os_error_line(exc)) from None
        except Exception as exc:  # edm_networks errors: imported lazily so pid.cli stays light
            from edm_networks import NetworkPickleError
            if isinstance(exc, NetworkPickleError):
                raise click.ClickException(" ".join(str(exc).split())) from None
            raise

    return wrapper


def check_output_dir(path: str, option: str) -> None:
    """Fail now, not after hours of work, when `path` cannot become a writable directory.

    Creates the directory (as the writer would) and probes it with a temporary file. Raises ConfigError.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option}={path} is an existing file, not a directory; give a directory path.")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".pid-write-test-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"{option}={path}: cannot write there ({exc.strerror or exc}); give a writable "
                          f"directory.") from None


def check_output_file(path: str, option: str, extensions: Sequence[str]) -> None:
    """Fail now when `path` cannot be written as a file with one of `extensions` (e.g. ('.png',)).

    Checks the extension, that `path` is not a directory, and that its folder is writable (without leaving
    a file behind). Raises ConfigError.
    """
    if os.path.isdir(path):
        raise ConfigError(f"{option}={path} is a directory; give a file name such as "
                          f"{os.path.join(path, 'out' + extensions[0])}.")
    if os.path.splitext(path)[1].lower() not in extensions:
        raise ConfigError(f"{option}={path}: the file name must end in {' or '.join(extensions)} "
                          f"(e.g. {os.path.splitext(path)[0] or 'out'}{extensions[0]}).")
    folder = os.path.dirname(os.path.abspath(path))
    check_output_dir(folder, f"{option} (folder of {path})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(f"{option}={path} exists and is not writable; remove it or choose another name.")


# TrainConfig fields that a training script's options set one to one.
TRAIN_FIELDS = ("outdir", "steps", "batch", "batch_gpu", "lr", "optimizer", "betas", "eps", "weight_decay", "warmup",
                "lr_schedule", "grad_clip", "precision", "ema", "default_ema", "seed", "snap", "keep_states",
                "keep_students", "snap_emas",
                "grid_every", "grid_seeds", "log_every", "eval_every", "resume", "device", "desc", "attention",
                "channels_last", "compile", "grad_sync", "plot", "tensorboard")


def parse_floats(text, option: str):
    """'0.9,0.99' → (0.9, 0.99); None stays None; anything else is a ConfigError naming the option."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated numbers, got {text!r}") from None


def merge_options(default: dict, presets: dict, preset, given: dict, edm_base: str | None = None,
                  teacher_recipes: dict | None = None) -> dict:
    """Embedded default ← preset ← options given explicitly (None means "not given").

    An EDM teacher given without a preset starts from preset `edm_base` (the real-teacher recipe, not the toy one);
    a built-in teacher with an entry in `teacher_recipes` (the network teachers) starts from the default updated by
    that entry.
    """
    if preset is not None and preset not in presets:
        raise ConfigError(f"unknown --preset={preset!r}; choose one of {', '.join(presets)}")
    opts = dict(default)
    teacher = given.get("teacher")
    if preset is not None:
        opts.update(presets[preset])
    elif teacher is not None and str(teacher) in (teacher_recipes or {}):
        opts.update(teacher_recipes[str(teacher)])
    elif edm_base and teacher is not None and not str(teacher).startswith("builtin:"):
        opts.update({k: v for k, v in presets[edm_base].items() if k not in ("teacher", "fid_ref")})
    opts.update({k: v for k, v in given.items() if v is not None})
    return opts


def train_config_from(opts: dict, desc: str):
    """The TrainConfig of merged options (`desc` names the run directory unless --desc was given)."""
    from pid.training import TrainConfig
    kw = {k: opts[k] for k in TRAIN_FIELDS if opts.get(k) is not None}
    kw["ema"] = parse_floats(opts["ema"], "--ema")
    kw["betas"] = parse_floats(opts.get("betas"), "--betas") or (0.9, 0.999)
    kw["grad_clip"] = opts.get("grad_clip")
    if str(opts.get("default_ema")).lower() == "raw":
        kw["default_ema"] = None
    elif opts.get("default_ema") is not None:
        values = parse_floats(opts["default_ema"], "--default-ema")
        if len(values) != 1:
            raise ConfigError(f"--default-ema expects one number or 'raw', got {opts['default_ema']!r}")
        kw["default_ema"] = values[0]
    kw.setdefault("desc", desc)
    return TrainConfig(**kw)


def echo_options(opts: dict) -> None:
    """--dry-run: print the merged settings."""
    for k in sorted(opts):
        click.echo(f"{k} = {opts[k]}")


def limit_threads() -> None:
    """One process on a CPU: no more torch threads than cores (oversubscription made steps 10-20x slower)."""
    import torch
    if os.environ.get("OMP_NUM_THREADS") is None and os.environ.get("WORLD_SIZE") is None:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))


def train_options(recipe: dict):
    """The trainer's click options, shared by every training script; `recipe` supplies the shown defaults."""
    opts = [
        click.option("--outdir", default="runs", help="Parent folder of the run directories"),
        click.option("--steps", type=int, default=None, help=f"Optimizer steps  [default: {recipe['steps']}]"),
        click.option("--batch", type=int, default=None, help=f"Global batch  [default: {recipe['batch']}]"),
        click.option("--batch-gpu", type=int, default=None, help="Images per forward/backward per process (accumulate)"),
        click.option("--lr", type=float, default=None, help=f"Learning rate  [default: {recipe['lr']:g}]"),
        click.option("--optimizer", type=click.Choice(["radam", "adam"]), default=None,
                     help=f"Optimizer  [default: {recipe['optimizer']}]"),
        click.option("--betas", default=None, help=f"Adam/RAdam betas  [default: {recipe.get('betas', '0.9,0.999')}]"),
        click.option("--eps", type=float, default=None, help=f"Adam/RAdam eps  [default: {recipe.get('eps', 1e-8):g}]"),
        click.option("--weight-decay", type=float, default=None, help="Weight decay  [default: 0]"),
        click.option("--warmup", type=int, default=None, help=f"Linear LR warm-up steps  [default: {recipe.get('warmup', 0)}]"),
        click.option("--lr-schedule", type=click.Choice(["constant", "linear"]), default=None,
                     help=f"[default: {recipe.get('lr_schedule', 'constant')}]"),
        click.option("--grad-clip", type=float, default=None,
                     help=f"Max global gradient norm  [default: {recipe.get('grad_clip') or 'none'}]"),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="[default: fp32]"),
        click.option("--ema", default=None, help=f"EMA decay rates, comma-separated  [default: {recipe['ema']}]"),
        click.option("--default-ema", default=None, help="EMA used for samples/evaluation/export, or 'raw'"),
        click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=None,
                     help="Random seed (noise, data order, init)  [default: 0]"),
        click.option("--snap", type=int, default=None, help="Steps between student/state snapshots"),
        click.option("--keep-states", type=int, default=None, help="Training states kept (0 = all)  [default: 2]"),
        click.option("--keep-students", type=int, default=None,
                     help="Student snapshots student-<step>.pt kept, newest first (0 = all)  [default: 0]"),
        click.option("--snap-emas", type=click.Choice(["default", "all"]), default=None,
                     help="Weights in student snapshots: the default EMA, or all EMAs  [default: default]"),
        click.option("--grid-every", type=int, default=None, help="Steps between sample grids (0 = never)"),
        click.option("--grid-seeds", type=int, default=None, help="Seeds in the sample grid"),
        click.option("--log-every", type=int, default=None, help="Steps between log lines"),
        click.option("--eval-every", type=int, default=None, help="Steps between evaluations (0 = never)"),
        click.option("--eval-num", type=int, default=None, help="Images per evaluation"),
        click.option("--fid-ref", default=None, help="FID reference statistics (.npz path/URL); needed for EDM teachers"),
        click.option("--detector", default=None, help="Feature network for FID  [default: EDM's Inception]"),
        click.option("--resume", default=None,
                     help="'auto' (newest state in --outdir of the same config), a run dir or a state file"),
        click.option("--device", default=None, help="Device  [default: cuda:LOCAL_RANK if available, else cpu]"),
        click.option("--desc", default=None, help="Run directory suffix  [default: from the settings]"),
        click.option("--attention", type=click.Choice(["edm", "sdpa"]), default=None,
                     help="Attention kernel: EDM's float32 op, or fused scaled_dot_product_attention  [default: edm]"),
        click.option("--channels-last", type=bool, default=None,
                     help="Networks in channels_last layout  [default: false]"),
        click.option("--compile", type=bool, default=None,
                     help="torch.compile student(s) and teacher  [default: false]"),
        click.option("--grad-sync", type=click.Choice(["ddp", "manual"]), default=None,
                     help="Several processes: DistributedDataParallel (overlapped) or summed after backward  "
                          "[default: ddp]"),
        click.option("--plot", type=bool, default=None,
                     help="Write report.png (curves and the newest grid) in the run directory after each evaluation "
                          "and snapshot  [default: true]"),
        click.option("--tensorboard", type=bool, default=None,
                     help="Also write scalars and sample grids to TensorBoard event files in run_dir/tensorboard/ "
                          "(pip install tensorboard)  [default: false]"),
        click.option("--dry-run", is_flag=True, help="Print the merged settings and exit"),
    ]

    def apply(fn):
        for option in reversed(opts):
            fn = option(fn)
        return fn
    return apply


def finish_run(result, steps: int) -> None:
    """Print the run directory (rank 0); exit with EXIT_INTERRUPTED when SIGINT/SIGTERM stopped the run early,
    so that a job script can tell a stopped run (state saved, continue with --resume=auto) from a finished one."""
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"run directory: {result}")
    if getattr(result, "interrupted", False):
        click.echo(f"interrupted at step {result.step} of {steps}; the state is saved: continue with "
                   f"--resume=auto (exit status {EXIT_INTERRUPTED})", err=True)
        raise SystemExit(EXIT_INTERRUPTED)


def check_device(opts: dict, preset: Optional[str]) -> None:
    """Stop before any work when the run needs CUDA that this machine lacks: an explicit --device=cuda..., or a
    preset or an EDM teacher (whose recipe is a preset's: batches sized for GPUs, days on a CPU) without --device.
    Raises ConfigError."""
    import torch
    device = opts.get("device")
    if torch.cuda.is_available():
        return
    if device is not None and str(device).startswith("cuda"):
        raise ConfigError(f"--device={device} but CUDA is not available on this machine (torch "
                          f"{torch.__version__}); use --device=cpu")
    if device is None and preset is not None:
        raise ConfigError(f"--preset={preset} is sized for CUDA GPUs (batch {opts.get('batch')}) and no CUDA device "
                          f"is available; pass --device=cpu to run it on the CPU anyway")
    teacher = str(opts.get("teacher") or "")
    from pid.download import is_url
    if not is_url(teacher) and not os.path.exists(teacher):
        return   # a built-in teacher, or a mistyped path that loading the teacher reports as such
    if device is None:   # an EDM teacher: merge_options gave it the real-teacher recipe
        raise ConfigError(f"an EDM teacher takes the real-teacher recipe, sized for CUDA GPUs (batch "
                          f"{opts.get('batch')}), and no CUDA device is available; pass --device=cpu to run it on the "
                          f"CPU anyway (with --batch and --steps to size it)")


def run_training(opts: dict, dry_run: bool, build_run, preset: Optional[str] = None) -> None:
    """The body of every training script: print the merged settings (--dry-run), or check the device, join the
    process group (before anything is loaded: every rank on its own device), build the run with
    `build_run(opts) -> (config, method, networks, extra, evaluate)`, train, and set the exit status."""
    if dry_run:
        echo_options(opts)
        return
    check_device(opts, preset)
    limit_threads()
    from pid.training import train
    from pid.training.distributed import init_distributed
    dist = init_distributed(opts.get("device"))
    try:
        config, method, networks, extra, evaluate = build_run(opts)
        finish_run(train(config, method, networks, extra_config=extra, evaluate=evaluate), config.steps)
    finally:
        dist.shutdown()


def training_evaluator(teacher, config, method_config):
    """The evaluator of a training script (None when --eval-every is 0): exact metrics for built-in teachers, FID
    with `--fid-ref` otherwise; `method_config` carries eval_num, fid_ref and detector. Under torchrun the seeds
    are split across the processes (each on its own device, the detector too) and the results gathered."""
    if not config.eval_every:
        return None
    from pid.metrics.evaluate import make_evaluator
    from pid.training.distributed import local_device
    return make_evaluator(teacher, num=method_config.eval_num, fid_ref=method_config.fid_ref,
                          detector=method_config.detector, device=local_device(config.device), distributed=None)
