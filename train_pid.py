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

from pid.cli import OneLineCommand, run_training, train_config_from, train_options, training_evaluator, user_errors
from pid.methods.pid.recipes import DEFAULT_RECIPE, PRESETS, pid_config_from, resolve_options


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
    pcfg = pid_config_from(opts)
    config = train_config_from(opts, _default_desc(opts))
    distance = DistanceConfig(name=pcfg.loss, huber_c=pcfg.huber_c, lpips_resize=pcfg.lpips_resize,
                              lpips_vgg=pcfg.lpips_vgg, lpips_pool=pcfg.lpips_pool)
    teacher = load_teacher(pcfg.teacher)
    method = PIDObjective(teacher, pcfg.discretization, distance, pcfg.sigma_min, pcfg.sigma_max, pcfg.rho,
                          residual_precision=pcfg.residual_precision, link_weights=pcfg.link_weights,
                          residual_grad=pcfg.residual_grad, time_weight=pcfg.time_weight,
                          residual_scheme=pcfg.residual_scheme)
    student = student_from_teacher(teacher, pcfg.teacher, pcfg.student_preset, method.sigma_min, method.sigma_max,
                                   seed=config.seed, init=pcfg.student_init)
    evaluate = training_evaluator(teacher, config, pcfg)
    extra = {"pid": dataclasses.asdict(pcfg), "student": student.export_spec()}
    return config, method, student, extra, evaluate


@click.command(cls=OneLineCommand, context_settings={"show_default": True})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Reference recipe (cifar10: RAdam 2e-4, batch 512, N=250, LPIPS, fp32; imagenet64: 1e-4, "
                   "batch 2048, fp16); other options override it")
@click.option("--teacher", default=None, help="EDM pickle path/URL or builtin:glyphs16|glyphs32|glyphs16-net  [default: builtin:glyphs16]")
@click.option("--student-preset", default=None, help="Student network for teachers without one (tiny, glyphs16, "
                                                   "glyphs32, glyphs16-w24, glyphs16-ddpmpp, glyphs32-ddpmpp)  "
                                                   "[default: glyphs<resolution>]")
@click.option("--student-init", default=None, help="EDM network pickle (path/URL/builtin:) whose U-Net and "
                                                 "weights start the student of a teacher without a network  "
                                                 "[default: none: a randomly initialised --student-preset]")
@click.option("--discretization", "-N", type=int, default=None, help=f"N, points of the Karras grid  [default: {DEFAULT_RECIPE['discretization']}; presets 250]")
@click.option("--rho", type=float, default=None, help=f"Karras grid exponent  [default: {DEFAULT_RECIPE['rho']:g}; presets 7]")
@click.option("--sigma-min", type=float, default=None, help="σ of one-step generation  [default: teacher's, ≥ 0.002]")
@click.option("--sigma-max", type=float, default=None, help="T, std of z  [default: teacher's, ≤ 80]")
@click.option("--loss", type=click.Choice(["lpips", "l2", "l1", "pseudo-huber"]), default=None,
              help="Distance of the PID residual  [default: l2; presets lpips]")
@click.option("--huber-c", type=float, default=None, help="pseudo-Huber c  [default: 0.00054·sqrt(C·H·W)]")
@click.option("--lpips-resize", type=int, default=None, help="Bilinear resize before LPIPS (0 = none)  [default: 224]")
@click.option("--lpips-pool", type=click.Choice(["avg", "max"]), default=None,
              help="VGG16 pooling of LPIPS: avg = the PID reference's (piq), max = the lpips package's  [default: avg]")
@click.option("--lpips-vgg", default=None, help="torchvision VGG16 weights file for LPIPS  [default: torchvision cache]")
@click.option("--residual-precision", type=click.Choice(["fp32", "amp"]), default=None,
              help="Under --precision=fp16|bf16: fp32 = the student and the finite difference in fp32 (accurate), "
                   "amp = the student under autocast too (the reference; rounding amplified by t/(t-t'))  "
                   "[default: fp32]")
@click.option("--residual-grad", type=click.Choice(["both", "lower"]), default=None,
              help="Which student outputs of a link carry gradient: both (the paper's) or lower (only the "
                   "lower-noise one, regressed onto the teacher's Euler step from the other)  [default: both]")
@click.option("--residual-scheme", type=click.Choice(["euler", "trapezoid"]), default=None,
              help="The residual's rule: euler (the paper's: the teacher at the link's upper point) or trapezoid "
                   "(the teacher at both ends, second order; one more teacher call)  [default: euler]")
@click.option("--time-weight", type=float, default=None,
              help="Power p of a link's loss weight max(|t/(t-t')|, 1)^p; 0 = the paper's uniform weight  "
                   "[default: 0]")
@click.option("--link-weights", default=None,
              help="Sampling weights of the N grid indices n (comma-separated, N numbers), or 'uniform' (the "
                   "paper's)  [default: uniform]")
@train_options(DEFAULT_RECIPE)
@user_errors
def main(preset, dry_run, **given):
    """Distill a teacher into a one-step PID student."""
    run_training(resolve_options(preset, given), dry_run, build_run, preset)


if __name__ == "__main__":
    main()
