"""Distill an EDM teacher into a k-step generator with Moment Matching (Salimans et al. 2024, Algorithms 2 and 3).

Examples:
    python train_mm.py --outdir=runs                                   # built-in glyph teacher, k=4, CPU, minutes
    python train_mm.py --outdir=runs --algorithm=parameter             # Algorithm 3: no auxiliary network
    torchrun --standalone --nproc_per_node=8 train_mm.py --preset=imagenet64 --data=imagenet-64x64.zip --outdir=runs
    torchrun --standalone --nproc_per_node=8 train_mm.py --preset=cifar10 --data=cifar10-32x32.zip --outdir=runs
    torchrun --standalone --nproc_per_node=8 train_mm.py --preset=cifar10 --data=teacher --outdir=runs  # no dataset
Settings: the embedded default, then --preset, then every option given explicitly.
"""

from __future__ import annotations

import dataclasses
import os

import click

from pid.cli import OneLineCommand, run_training, train_config_from, train_options, training_evaluator, user_errors
from pid.methods.mm.objective import WEIGHTS
from pid.methods.mm.parameter import PRECONDITIONERS
from pid.methods.mm.recipes import ALGORITHMS, DEFAULT_RECIPE, PRESETS, mm_config_from, resolve_options


def _default_desc(opts: dict) -> str:
    teacher = os.path.basename(str(opts["teacher"])).replace("builtin:", "").removesuffix(".pkl")
    return f"mm-{teacher}-k{opts['k']}-{opts['algorithm']}-b{opts['batch']}"


def build_run(opts: dict):
    """(TrainConfig, method, networks, extra_config, evaluate) from merged options."""
    from pid.methods.mm import build_mm_run
    cfg = mm_config_from(opts)
    config = train_config_from(opts, _default_desc(opts))
    if cfg.algorithm == "parameter" and config.batch % 2:
        from pid.errors import ConfigError
        raise ConfigError(f"--algorithm=parameter splits every micro-batch into halves A and B: --batch must be "
                          f"even, got {config.batch}")
    method, nets, teacher = build_mm_run(cfg, seed=config.seed)
    evaluate = training_evaluator(teacher, config, cfg)
    extra = {"mm": dataclasses.asdict(cfg), "student": nets["generator"].export_spec()}
    return config, method, nets, extra, evaluate


@click.command(cls=OneLineCommand, context_settings={"show_default": True})
@click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
              help="Recipe (imagenet64: the paper's, k=8, batch 2048, lr 1e-5, bf16; cifar10: k=2, batch 512, "
                   "lr 5e-6); other options override it")
@click.option("--teacher", default=None, help="EDM pickle path/URL or builtin:glyphs16|glyphs32|glyphs16-net  [default: builtin:glyphs16]")
@click.option("--data", default=None, help="Training images: EDM dataset zip or image folder, or 'teacher' for the "
                                           "teacher's own samples (no dataset; generated once into the run "
                                           "directory)  [default: exact samples for built-in teachers; required "
                                           "for EDM teachers]")
@click.option("--teacher-data-num", type=click.IntRange(min=1), default=None,
              help="--data=teacher: samples generated  [default: 10000]")
@click.option("--teacher-data-steps", type=click.IntRange(min=1), default=None,
              help="--data=teacher: Heun steps per sample (NFE 2·steps−1)  [default: 18]")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default=None,
              help="alternating: Algorithm 2, generator and auxiliary denoiser; parameter: Algorithm 3, moments "
                   "matched in the teacher's parameter space (no auxiliary network)  [default: alternating]")
@click.option("--k", type=int, default=None, help=f"Sampling steps of the student  [default: {DEFAULT_RECIPE['k']}; "
                                                  "presets: imagenet64 8, cifar10 2]")
@click.option("--rho", type=float, default=None, help="t→σ map exponent (Karras interpolation)  [default: 7]")
@click.option("--sigma-min", type=float, default=None, help="σ(t=0)  [default: teacher's, ≥ 0.002]")
@click.option("--sigma-max", type=float, default=None, help="σ(t=1)  [default: teacher's, ≤ 80]")
@click.option("--weight", type=click.Choice(WEIGHTS), default=None, help="w(σ_s) of both losses  [default: edm]")
@click.option("--sigma-floor", type=float, default=None, help="edm-bounded: w constant below this σ  [default: 0.1]")
@click.option("--force-t1", type=bool, default=None, help="Train every sample from t = 1 (one-step variant)  [default: false]")
@click.option("--aux-lr-mult", type=float, default=None, help="Auxiliary denoiser's lr / the generator's  [default: 1]")
@click.option("--mixture-adjust", type=bool, default=None,
              help="Built-in teachers: both networks also get σ-dependent mixture weights, sharpness and spread "
                   "(zero at start); ignored for EDM teachers  [default: true]")
@click.option("--student-preset", default=None, help="Residual network for built-in teachers  [default: glyphs<resolution>]")
@click.option("--preconditioner", type=click.Choice(PRECONDITIONERS), default=None,
              help="Algorithm 3's Λ: adam (online EMA of squared teacher gradients; EDM pickles carry no optimizer "
                   "state) or identity  [default: adam]")
@click.option("--precond-beta2", type=float, default=None, help="adam Λ: EMA rate of squared gradients  [default: 0.99]")
@click.option("--precond-eps", type=float, default=None, help="adam Λ: 1/(sqrt(v)+eps)  [default: 1e-8]")
@click.option("--subtract-data-grad", type=bool, default=None,
              help="Algorithm 3: subtract the teacher's gradient on real data  [default: false]")
@train_options(DEFAULT_RECIPE)
@user_errors
def main(preset, dry_run, **given):
    """Distill a teacher into a k-step moment-matching student."""
    run_training(resolve_options(preset, given), dry_run, build_run, preset)


if __name__ == "__main__":
    main()
