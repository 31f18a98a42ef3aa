"""How good the shipped network teacher is: its denoiser against the exact one, and how converged its ODE reference is.

Prints, for `builtin:glyphs16-net` (or another file via --pkl), the RMS of D_net − D_exact per σ and its ratio to
the correction D has to make, RMS(x − D_exact) (`pid.make_teacher.denoiser_error`, 300 noisy exact samples), then
Heun endpoints of 200 seeds (1000000-1000199) with 16, 64 and 256 steps: RMSE of 16 and 64 against 256 and the share
of seeds whose endpoint lies on the same mixture component (64 vs 256).

    OMP_NUM_THREADS=1 python bench/network_teacher_check.py
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid.exact_eval import heun_endpoints  # noqa: E402
from pid.make_teacher import denoiser_error  # noqa: E402
from pid.metrics.evaluate import seed_inputs  # noqa: E402
from pid.teachers import load_teacher  # noqa: E402


@click.command()
@click.option("--teacher", "spec", default="builtin:glyphs16-net", show_default=True, help="A built-in network teacher")
def main(spec):
    teacher = load_teacher(spec)
    mix = teacher.data_distribution
    errs = denoiser_error(teacher.net, mix, sigmas=(0.002, 0.02, 0.05, 0.2, 1.0, 5.0, 20.0, 80.0), num=300, seed=7)
    print("| σ | RMS(D_net − D_exact) | relative to RMS(x − D_exact) |\n|---:|---:|---:|")
    for s, v in errs.items():
        print(f"| {s} | {v['rms_error']:.4f} | {v['rms_error'] / v['rms_correction']:.3f} |")
    z, c = seed_inputs(list(range(1000000, 1000200)), [teacher.img_channels, teacher.img_resolution,
                                                       teacher.img_resolution], teacher.label_dim, torch.device("cpu"))
    t0 = time.perf_counter()
    ref = {n: heun_endpoints(teacher, z, c, n, 200) for n in (16, 64, 256)}
    rmse = lambda a, b: float((a - b).square().flatten(1).mean(1).sqrt().mean())  # noqa: E731
    same = float((mix.component_of(ref[64], c) == mix.component_of(ref[256], c)).double().mean())
    print(f"\nHeun endpoints, 200 seeds ({time.perf_counter() - t0:.0f} s): RMSE 16 vs 256 steps "
          f"{rmse(ref[16], ref[256]):.2e}, 64 vs 256 {rmse(ref[64], ref[256]):.2e}, same component 64/256 "
          f"{100 * same:.1f}%")


if __name__ == "__main__":
    main()  # pylint: disable=no-value-for-parameter
