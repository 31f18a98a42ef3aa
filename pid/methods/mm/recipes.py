"""Settings of a moment-matching run: the method's dataclass and the named recipes `train_mm.py` starts from.

As for PID: the embedded default, updated by `--preset`, updated by every option given on the command line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from pid.methods.pid.recipes import EDM_PRETRAINED

__all__ = ["MMConfig", "DEFAULT_RECIPE", "PRESETS", "TEACHER_RECIPES", "ALGORITHMS", "resolve_options",
           "mm_config_from"]

ALGORITHMS = ("alternating", "parameter")


@dataclass
class MMConfig:
    """Moment-matching settings (the generic ones are pid.training.TrainConfig)."""
    teacher: str = "builtin:glyphs16"      # EDM pickle path/URL or builtin:<name>
    data: Optional[str] = None             # EDM dataset zip or image folder; 'teacher': the teacher's own samples;
                                           # None: exact samples (built-in teachers)
    teacher_data_num: Optional[int] = None    # --data=teacher: samples generated (None: 10000)
    teacher_data_steps: Optional[int] = None  # --data=teacher: Heun steps of each (None: 18, NFE 35)
    algorithm: str = "alternating"         # alternating: Algorithm 2 (auxiliary denoiser); parameter: Algorithm 3
    k: int = 4                             # sampling steps of the student
    rho: float = 7.0                       # t→σ map: Karras interpolation between sigma_min and sigma_max
    sigma_min: Optional[float] = None      # None: the teacher's, clipped to [0.002, 80]
    sigma_max: Optional[float] = None
    weight: str = "edm"                    # w(σ_s): edm, edm-bounded or uniform
    sigma_floor: float = 0.1               # edm-bounded: w is constant below this σ
    force_t1: bool = False                 # t ≡ 1 (one-step methods' variant; meaningful for k = 1)
    aux_lr_mult: float = 1.0               # auxiliary denoiser's learning rate / the generator's
    mixture_adjust: bool = True            # built-in teachers: σ-dependent mixture weights/sharpness/spread too
                                           # (EDM teachers: ignored, their whole network is copied)
    student_preset: Optional[str] = None   # residual network for built-in teachers (None: glyphs<resolution>)
    preconditioner: str = "adam"           # Algorithm 3's Λ: identity, or adam (online EMA of squared teacher grads)
    precond_beta2: float = 0.99            # adam: EMA rate of the squared teacher gradient
    precond_eps: float = 1e-8              # adam: Λ = 1/(√v̂ + eps)
    subtract_data_grad: bool = False       # Algorithm 3: moment relative to the teacher's gradient on real data
    eval_num: int = 1000
    fid_ref: Optional[str] = None
    detector: Optional[str] = None


# The embedded default distils builtin:glyphs16 into a k = 4 student on a CPU in minutes. Optimizer as the paper
# (Adam β1 = 0, β2 = 0.99, ε = 1e-12, warm-up then linear decay, clip 1). Measured in BENCHMARKS.md (moment
# matching): with the mixture corrections on, three seeds beat the teacher's own 4-step sampler on every metric and
# its 17-NFE Heun sampler on FD ((a)); without them the student moved no further than the run-to-run spread. The
# recipe search ((c), before the corrections): momentum (β1 0.9) made generator and auxiliary network chase each
# other, a 5x learning rate or a faster auxiliary network did not help, w = edm spreads the generator update over
# all σ ranges ((b)), and EDM's ρ = 7 map is kept (ρ = 25 improves the teacher's own 4-step sampler, but no
# student trained on it improved its mode frequencies).
DEFAULT_RECIPE: dict = dict(
    teacher="builtin:glyphs16", data=None, teacher_data_num=None, teacher_data_steps=None, algorithm="alternating", k=4, rho=7.0, weight="edm", sigma_floor=0.1,
    force_t1=False, aux_lr_mult=1.0, mixture_adjust=True, student_preset=None, preconditioner="adam",
    precond_beta2=0.99, precond_eps=1e-8, subtract_data_grad=False,
    steps=2000, batch=32, lr=2e-3, optimizer="adam", betas="0.0,0.99", eps=1e-12, precision="fp32",
    ema="0.99,0.995", default_ema=0.99, warmup=100, lr_schedule="linear", grad_clip=1.0, snap=500,
    grid_every=500, grid_seeds=64, log_every=10, eval_every=500, eval_num=2000,
)

_PAPER_OPT = dict(mixture_adjust=False, optimizer="adam", betas="0.0,0.99", eps=1e-12, lr_schedule="linear",
                  grad_clip=1.0, warmup=1000, weight="edm", rho=7.0, log_every=100, snap=5000, grid_every=5000,
                  eval_every=5000, eval_num=50_000)

PRESETS: dict[str, dict] = {
    # The paper's ImageNet-64 recipe (batch 2048, k = 8, ≤ 200k steps, FID every 5k steps, lr 1e-5) on EDM's ADM
    # teacher. bf16: the surrogate's values span orders of magnitude with w(σ), and bf16 needs no loss scale.
    "imagenet64": dict(teacher=EDM_PRETRAINED + "edm-imagenet-64x64-cond-adm.pkl", k=8, steps=200_000, batch=2048,
                       batch_gpu=32, lr=1e-5, precision="bf16", ema="0.999,0.9999", default_ema=0.999,
                       fid_ref="https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/imagenet-64x64.npz", **_PAPER_OPT),
    # Not in the paper (no CIFAR-10 there): EDM's class-conditional CIFAR-10 teacher, k = 2, EDM's own batch 512 and
    # the paper's lr scaled by sqrt(512/2048) (Adam's usual rule for a 4x smaller batch); 100k steps = 51 Mimg,
    # a quarter of EDM's teacher training, since the student starts at the teacher. fp32 as EDM trained CIFAR-10.
    "cifar10": dict(teacher=EDM_PRETRAINED + "edm-cifar10-32x32-cond-vp.pkl", k=2, steps=100_000, batch=512,
                    batch_gpu=None, lr=5e-6, precision="fp32", ema="0.999,0.9999", default_ema=0.999,
                    fid_ref="https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz", **_PAPER_OPT),
}


# Built-in network teachers (EDM pickles trained on a built-in mixture, pid.make_teacher): generator and auxiliary
# denoiser are copies of the teacher network, as for any EDM teacher (no mixture corrections, no mixture θ), data
# are exact mixture samples. Learning rate for a copied network, k = 4, 600 steps, evaluation seeds 0-1999 (FD / TV):
# lr 1e-4 1.32 / 0.104, 2.5e-4 0.98 / 0.098, 5e-4 0.97 / 0.104, 2e-3 1.54 / 0.109 (the teacher's own 4-step
# sampler: 4.54 / 0.139); 1000 steps, since the copy starts at the teacher (BENCHMARKS.md, "Network teacher").
TEACHER_RECIPES: dict[str, dict] = {
    "builtin:glyphs16-net": dict(lr=5e-4, steps=1000),
}

# Algorithm 3 on the same teachers wants half Algorithm 2's step: at 5e-4 (1000 steps, evaluation seeds
# 1000000-1001999) its FD was 2.14 / 2.41 / 4.40 over training seeds 0 / 1 / 2 (seed 2 worse than the 4-step
# sampler's 4.35), at 2.5e-4 0.98 / 0.99 / 1.35 (BENCHMARKS.md, "Network teacher").
ALGORITHM_RECIPES: dict[tuple[str, str], dict] = {
    ("builtin:glyphs16-net", "parameter"): dict(lr=2.5e-4),
}


def resolve_options(preset: Optional[str], given: dict) -> dict:
    """Merge: embedded default ← preset ← options given explicitly (None means "not given"); a built-in teacher
    without a preset also gets its TEACHER_RECIPES entry, then its ALGORITHM_RECIPES entry for the algorithm."""
    from pid.cli import merge_options
    opts = merge_options(DEFAULT_RECIPE, PRESETS, preset, given, edm_base="cifar10", teacher_recipes=TEACHER_RECIPES)
    if preset is None:
        extra = ALGORITHM_RECIPES.get((str(given.get("teacher")), str(opts.get("algorithm"))), {})
        opts.update({k: v for k, v in extra.items() if given.get(k) is None})
    return opts


def mm_config_from(opts: dict) -> MMConfig:
    """The MMConfig fields of a merged option dict."""
    names = {f.name for f in dataclasses.fields(MMConfig)}
    return MMConfig(**{k: v for k, v in opts.items() if k in names})
