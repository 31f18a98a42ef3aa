"""Settings of a PID run: the method's dataclass and the named recipes `train_pid.py` starts from.

A recipe is a dict of option values (CLI names with underscores). The run's settings are: the embedded default,
updated by `--preset`, updated by every option given on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from pid.errors import ConfigError

__all__ = ["PIDConfig", "EDM_PRETRAINED", "DEFAULT_RECIPE", "PRESETS", "TEACHER_RECIPES", "resolve_options",
           "pid_config_from"]

EDM_PRETRAINED = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"


@dataclass
class PIDConfig:
    """PID-specific settings (the generic ones are pid.training.TrainConfig)."""
    teacher: str = "builtin:glyphs16"      # EDM pickle path/URL or builtin:<name>
    student_preset: Optional[str] = None   # network preset for teachers without a network (None: by resolution)
    student_init: Optional[str] = None     # EDM network pickle whose U-Net starts the student (teachers without one)
    discretization: int = 250              # N, points of the Karras grid
    rho: float = 7.0
    sigma_min: Optional[float] = None      # None: the teacher's, clipped to [0.002, 80]
    sigma_max: Optional[float] = None
    loss: str = "lpips"
    huber_c: Optional[float] = None
    lpips_resize: int = 224
    lpips_vgg: Optional[str] = None
    lpips_pool: str = "avg"                # VGG16 pooling of LPIPS: avg (the PID reference's, piq) or max (lpips)
    residual_precision: str = "fp32"       # student + finite difference in fp32 under fp16/bf16 ('amp': autocast)
    residual_grad: str = "both"            # 'both' (the paper's) or 'lower': only the lower-noise output of a link
    time_weight: float = 0.0               # link n's loss × max(|t/(t − t')|, 1)^p; 0: the paper's uniform weight
    residual_scheme: str = "euler"         # 'euler' (the paper's) or 'trapezoid' (teacher at both ends of a link)
    link_weights: Optional[str] = None     # sampling weights of the N grid indices (None/'uniform': the paper's)
    eval_num: int = 1000                   # images per evaluation
    fid_ref: Optional[str] = None          # FID reference statistics (.npz path/URL) for EDM teachers
    detector: Optional[str] = None         # feature network for FID (None: EDM's Inception URL)


# The embedded default: distil the built-in glyph teacher on a CPU in under 15 minutes on 2 cores with a distance
# that needs no download. N=12: a short chain of finite differences whose fixed point (11 Euler steps) still lands
# on the exact endpoint's component for ~96% of seeds. rho=1.5 instead of EDM's 7 (a more even spacing): measured,
# not derived, the student learned markedly faster with it (component accuracy at step 1000: rho 7 / 3 / 2 / 1.5 =
# 0.61 / 0.66 / 0.73 / 0.78; rho 1 caps the fixed point at 91%). Adam (beta2=0.99) because RAdam's rectification
# keeps the step size small for the first thousands of steps; lr 6e-3 (4e-3 and 8e-3 were within the training-seed
# spread). The student is the `glyphs16` preset, a small ADM U-Net (pid.student_presets). Quality is bought with
# steps, not with any other knob measured (BENCHMARKS.md, "PID on the analytic teacher"): 6000 steps with a linear
# decay, the most that fits the 15-minute budget, beat 2000 constant-lr steps by 1-3 points of component accuracy
# and 0.02-0.03 of RMSE on every training seed. The presets keep the reference's rho=7 and constant lr.
DEFAULT_RECIPE: dict = dict(
    teacher="builtin:glyphs16", student_preset=None, student_init=None, discretization=12, rho=1.5, loss="l2",
    steps=6000, batch=32, lr=6e-3, lr_schedule="linear", optimizer="adam", betas="0.9,0.99", precision="fp32",
    ema="0.995,0.999", default_ema=0.995, warmup=0, grad_clip=None, snap=1000, grid_every=1000, grid_seeds=64,
    log_every=10, eval_every=1000, eval_num=500,
)

# The reference recipes (docs/pid.md §(c)): they follow the released scripts (no gradient clipping; CIFAR-10 in
# fp32), not the paper's Table 6, which lists clipping and FP16 for both; pass --grad-clip / --precision for that.
# Their LPIPS is the reference's: piq's VGG16 with average pooling (lpips_pool="avg"), resized to 224. ImageNet-64
# runs in fp16 as the reference, except the student and the finite difference (residual_precision="fp32"): the
# reference's fp16 student makes the residual's rounding error t/(t − t') times larger (BENCHMARKS.md, PID (e)).
PRESETS: dict[str, dict] = {
    "cifar10": dict(teacher=EDM_PRETRAINED + "edm-cifar10-32x32-uncond-vp.pkl", discretization=250, rho=7.0,
                    loss="lpips", lpips_pool="avg",
                    steps=800_000, batch=512, batch_gpu=None, lr=2e-4, lr_schedule="constant", optimizer="radam",
                    betas="0.9,0.999",
                    precision="fp32",
                    ema="0.999,0.9999,0.99995", default_ema=0.99995, warmup=0, grad_clip=None, snap=10_000,
                    grid_every=10_000, log_every=100, eval_every=0, eval_num=50_000,
                    fid_ref="https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz"),
    "imagenet64": dict(teacher=EDM_PRETRAINED + "edm-imagenet-64x64-cond-adm.pkl", discretization=250, rho=7.0,
                       loss="lpips", lpips_pool="avg",
                       steps=400_000, batch=2048, batch_gpu=32, lr=1e-4, lr_schedule="constant", optimizer="radam",
                       betas="0.9,0.999",
                       precision="fp16", residual_precision="fp32",
                       ema="0.999,0.9999,0.99995", default_ema=0.99995, warmup=0, grad_clip=None, snap=10_000,
                       grid_every=10_000, log_every=100, eval_every=0, eval_num=50_000,
                       fid_ref="https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz"),
}


# Built-in network teachers (EDM pickles trained on a built-in mixture, pid.make_teacher): the student is a copy of
# the teacher's U-Net, as for any EDM teacher; the rest is the embedded default's CPU-sized recipe. A copied network
# wants a smaller step than a random one: after 600 steps (500 evaluation seeds) lr 6e-3 / 2e-3 / 1e-3 reached
# 80.8% / 91.8% / 93.0% component accuracy (RMSE 0.175 / 0.137 / 0.144), and it starts so close that 1000 steps
# suffice (BENCHMARKS.md, "Network teacher"), at a constant lr with an evaluation every 500 steps.
TEACHER_RECIPES: dict[str, dict] = {
    "builtin:glyphs16-net": dict(lr=1e-3, steps=1000, lr_schedule="constant", snap=500, grid_every=500,
                                 eval_every=500),
}


def resolve_options(preset: Optional[str], given: dict) -> dict:
    """Merge: embedded default ← preset ← options given explicitly (None means "not given").

    An EDM teacher without a preset gets the reference's settings (as --preset=cifar10), not the toy ones.
    """
    from pid.cli import merge_options
    return merge_options(DEFAULT_RECIPE, PRESETS, preset, given, edm_base="cifar10", teacher_recipes=TEACHER_RECIPES)


def pid_config_from(opts: dict) -> PIDConfig:
    """The PIDConfig fields of a merged option dict."""
    names = {f.name for f in dataclasses.fields(PIDConfig)}
    return PIDConfig(**{k: v for k, v in opts.items() if k in names})
