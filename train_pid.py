"""Distill an EDM teacher into a one-step generator with Physics Informed Distillation (PID).

Examples:
    python train_pid.py --outdir=runs                         # built-in glyph teacher, minutes on a CPU
    python train_pid.py --outdir=runs --preset=cifar10        # the reference CIFAR-10 recipe
    torchrun --nproc_per_node=8 train_pid.py --outdir=runs --preset=imagenet64 --batch-gpu=32
Settings: the embedded default, then --preset, then every option given explicitly.
"""

from __future__ import annotations

import dataclasses
import os

import click

from pid.cli import EXIT_INTERRUPTED, OneLineCommand, user_errors
from pid.methods.pid.recipes import DEFAULT_RECIPE, PRESETS, pid_config_from, resolve_options

_TRAIN_FIELDS = ("outdir", "steps", "batch", "batch_gpu", "lr", "optimizer", "betas", "eps", "weight_decay", "warmup",
                 "lr_schedule", "grad_clip", "precision", "ema", "default_ema", "seed", "snap", "keep_states",
                 "grid_every", "grid_seeds", "log_every", "eval_every", "resume", "device", "desc")


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    from pid.errors import ConfigError
    try:
        return tuple(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} expects comma-separated numbers, got {text!r}") from None


def _one_float(text: str, option: str, alternative: str = "") -> float:
    values = _floats(text, option)
    if len(values) != 1:
        from pid.errors import ConfigError
        raise ConfigError(f"{option} expects one number {alternative}, got {text!r}")
    return values[0]


def _default_desc(opts: dict) -> str:
    teacher = os.path.basename(str(opts["teacher"])).replace("builtin:", "").removesuffix(".pkl")
    rho = float(opts.get("rho", 7.0))
    grid = f"N{opts['discretization']}" + ("" if rho == 7.0 else f"-rho{rho:g}")
    return f"pid-{teacher}-{opts['loss']}-{grid}-b{opts['batch']}"


def build_run(opts: dict):
    """(TrainConfig, PIDObjective, student, extra_config, evaluate) from merged options; loads the teacher."""
    from pid.distances import DistanceConfig
    from pid.methods.pid import PIDObjective
    from pid.methods.pid.student import student_from_teacher
    from pid.teachers import load_teacher
    from pid.training import TrainConfig
    pcfg = pid_config_from(opts)
    train_kw = {k: opts[k] for k in _TRAIN_FIELDS if opts.get(k) is not None}
    train_kw["ema"] = _floats(opts["ema"], "--ema")
    train_kw["betas"] = _floats(opts.get("betas"), "--betas") or (0.9, 0.999)
    train_kw["grad_clip"] = opts.get("grad_clip")
    if str(opts.get("default_ema")).lower() == "raw":
        train_kw["default_ema"] = None
    elif opts.get("default_ema") is not None:
        train_kw["default_ema"] = _one_float(opts["default_ema"], "--default-ema", "or 'raw'")
    train_kw.setdefault("desc", _default_desc(opts))
    config = TrainConfig(**train_kw)
    distance = DistanceConfig(name=pcfg.loss, huber_c=pcfg.huber_c, lpips_resize=pcfg.lpips_resize,
                              lpips_vgg=pcfg.lpips_vgg)
    teacher = load_teacher(pcfg.teacher)
    method = PIDObjective(teacher, pcfg.discretization, distance, pcfg.sigma_min, pcfg.sigma_max, pcfg.rho)
    student = student_from_teacher(teacher, pcfg.teacher, pcfg.student_preset, method.sigma_min, method.sigma_max,
                                   seed=config.seed)
    evaluate = None
    if config.eval_every:
        from pid.metrics.evaluate import make_evaluator
        evaluate = make_evaluator(teacher, num=pcfg.eval_num, fid_ref=pcfg.fid_ref, detector=pcfg.detector,
                                  distributed=False)
    extra = {"pid": dataclasses.asdict(pcfg), "student": student.export_spec()}
    return config, method, student, extra, evaluate


@click.command(cls=OneLineCommand, context_settings={"show_default": True})
@click.option("--outdir", default="runs", help="Parent folder of the run directories")
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Reference recipe (cifar10: RAdam 2e-4, batch 512, N=250, LPIPS, fp32; imagenet64: 1e-4, "
                   "batch 2048, fp16); other options override it")
@click.option("--teacher", default=None, help="EDM pickle path/URL or builtin:glyphs16|glyphs32  [default: builtin:glyphs16]")
@click.option("--student-preset", default=None, help="Student network for teachers without one (tiny, glyphs16, "
                                                   "glyphs32, glyphs16-ddpmpp, glyphs32-ddpmpp)  [default: "
                                                   "glyphs<resolution>]")
@click.option("--discretization", "-N", type=int, default=None, help=f"N, points of the Karras grid  [default: {DEFAULT_RECIPE['discretization']}; presets 250]")
@click.option("--rho", type=float, default=None, help=f"Karras grid exponent  [default: {DEFAULT_RECIPE['rho']:g}; presets 7]")
@click.option("--sigma-min", type=float, default=None, help="σ of one-step generation  [default: teacher's, ≥ 0.002]")
@click.option("--sigma-max", type=float, default=None, help="T, std of z  [default: teacher's, ≤ 80]")
@click.option("--loss", type=click.Choice(["lpips", "l2", "l1", "pseudo-huber"]), default=None,
              help="Distance of the PID residual  [default: l2; presets lpips]")
@click.option("--huber-c", type=float, default=None, help="pseudo-Huber c  [default: 0.00054·sqrt(C·H·W)]")
@click.option("--lpips-resize", type=int, default=None, help="Bilinear resize before LPIPS (0 = none)  [default: 224]")
@click.option("--lpips-vgg", default=None, help="torchvision VGG16 weights file for LPIPS  [default: torchvision cache]")
@click.option("--steps", type=int, default=None, help=f"Optimizer steps  [default: {DEFAULT_RECIPE['steps']}]")
@click.option("--batch", type=int, default=None, help=f"Global batch  [default: {DEFAULT_RECIPE['batch']}]")
@click.option("--batch-gpu", type=int, default=None, help="Images per forward/backward per process (accumulate)")
@click.option("--lr", type=float, default=None, help=f"Learning rate  [default: {DEFAULT_RECIPE['lr']:g}]")
@click.option("--optimizer", type=click.Choice(["radam", "adam"]), default=None, help=f"Optimizer  [default: {DEFAULT_RECIPE['optimizer']}; presets radam]")
@click.option("--betas", default=None, help="Adam/RAdam betas, e.g. 0.9,0.999")
@click.option("--eps", type=float, default=None, help="Adam/RAdam eps  [default: 1e-8]")
@click.option("--weight-decay", type=float, default=None, help="Weight decay  [default: 0]")
@click.option("--warmup", type=int, default=None, help="Linear LR warm-up steps  [default: 0]")
@click.option("--lr-schedule", type=click.Choice(["constant", "linear"]), default=None, help="[default: constant]")
@click.option("--grad-clip", type=float, default=None, help="Max global gradient norm  [default: none]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None, help="[default: fp32]")
@click.option("--ema", default=None, help=f"EMA decay rates, comma-separated  [default: {DEFAULT_RECIPE['ema']}]")
@click.option("--default-ema", default=None, help="EMA used for samples/evaluation/export, or 'raw'")
@click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=None, help="Random seed (noise, grid indices, student init)  [default: 0]")
@click.option("--snap", type=int, default=None, help="Steps between student/state snapshots")
@click.option("--keep-states", type=int, default=None, help="Training states kept (0 = all)  [default: 2]")
@click.option("--grid-every", type=int, default=None, help="Steps between sample grids (0 = never)")
@click.option("--grid-seeds", type=int, default=None, help="Seeds in the sample grid")
@click.option("--log-every", type=int, default=None, help="Steps between log lines")
@click.option("--eval-every", type=int, default=None, help="Steps between evaluations (0 = never)")
@click.option("--eval-num", type=int, default=None, help="Images per evaluation")
@click.option("--fid-ref", default=None, help="FID reference statistics (.npz path/URL); needed for EDM teachers")
@click.option("--detector", default=None, help="Feature network for FID  [default: EDM's Inception]")
@click.option("--resume", default=None, help="'auto' (newest state in --outdir of the same config), a run dir or a state file")
@click.option("--device", default=None, help="Device  [default: cuda:LOCAL_RANK if available, else cpu]")
@click.option("--desc", default=None, help="Run directory suffix  [default: from teacher, loss, N, ρ (when not 7), batch]")
@click.option("--dry-run", is_flag=True, help="Print the merged settings and exit")
@user_errors
def main(preset, dry_run, **given):
    """Distill a teacher into a one-step PID student."""
    opts = resolve_options(preset, given)
    if dry_run:
        for k in sorted(opts):
            click.echo(f"{k} = {opts[k]}")
        return
    import torch
    if os.environ.get("OMP_NUM_THREADS") is None and os.environ.get("WORLD_SIZE") is None:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    config, method, student, extra, evaluate = build_run(opts)
    from pid.training import train
    run_dir = train(config, method, student, extra_config=extra, evaluate=evaluate)
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"run directory: {run_dir}")
    if getattr(run_dir, "interrupted", False):   # a job script must tell a stopped run from a finished one
        click.echo(f"interrupted at step {run_dir.step} of {config.steps}; the state is saved: continue with "
                   f"--resume=auto (exit status {EXIT_INTERRUPTED})", err=True)
        raise SystemExit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
