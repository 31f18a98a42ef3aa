"""Teacher yardstick: EDM's Heun sampler at NFE 1..79 against the exact ODE solution of a built-in teacher.

For `builtin:glyphs32` (or any analytic teacher) and the same seeds (EDM's per-seed latents and random class
labels, as sample.py draws them), prints a markdown table: RMSE to a reference solution of the same ODE
(≥ 511 NFE), the fraction of samples on the same mixture component as the reference, and the mean
log-likelihood under the true mixture, next to that of exact data samples. Distilled students are placed on
this table by bench/pid_default_run.py.

    python bench/teacher_nfe.py --teacher=builtin:glyphs32 --seeds=0-999
"""

import os
import platform
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid.cli import user_errors  # noqa: E402
from pid.errors import ConfigError  # noqa: E402
from pid.exact_eval import exact_metrics, heun_endpoints, reference_endpoints  # noqa: E402
from pid.seeds import StackedRandomGenerator, parse_seeds  # noqa: E402
from pid.teachers import load_teacher  # noqa: E402


def draw_inputs(teacher, seeds, device):
    """EDM's per-seed latents [N,C,H,W] and one-hot labels (random per seed, drawn after the latents)."""
    rnd = StackedRandomGenerator(device, seeds)
    res, ch = teacher.img_resolution, teacher.img_channels
    latents = rnd.randn([len(seeds), ch, res, res], device=device)
    labels = None
    if teacher.label_dim:
        labels = torch.eye(teacher.label_dim, device=device)[rnd.randint(teacher.label_dim, size=[len(seeds)],
                                                                          device=device)]
    return latents, labels


def table_rows(teacher, latents, labels, reference, steps_list, batch):
    rows = []
    for steps in steps_list:
        t0 = time.perf_counter()
        images = heun_endpoints(teacher, latents, labels, steps, batch).clamp(-1, 1)  # as sample.py saves them
        m = exact_metrics(teacher, images, reference, labels)
        rows.append((f"Heun, {steps} steps", 2 * steps - 1, m, time.perf_counter() - t0))
    return rows


def format_table(rows, ref_row, data_ll):
    lines = ["| sampler | NFE | RMSE to reference | same component | log-likelihood (nats) | time (s) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, nfe, m, secs in rows + [ref_row]:
        lines.append(f"| {name} | {nfe} | {m['rmse']:.4f} | {100 * m['component_accuracy']:.1f}% | "
                     f"{m['log_likelihood']:.1f} | {secs:.1f} |")
    lines.append(f"| exact data samples | – | – | – | {data_ll:.1f} | – |")
    return "\n".join(lines)


@click.command()
@click.option("--teacher", "spec", default="builtin:glyphs32", show_default=True, help="An analytic teacher")
@click.option("--seeds", default="0-999", show_default=True, help="Seeds (EDM range syntax)")
@click.option("--steps", "steps_list", default="1,2,3,5,9,18,40", show_default=True,
              help="Heun step counts (NFE = 2*steps-1)")
@click.option("--ref-steps", type=click.IntRange(min=256), default=512, show_default=True,
              help="Reference solver steps (NFE = 2*steps-1)")
@click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True, help="Images per call")
@click.option("--device", default="cpu", show_default=True, help="torch device")
@user_errors
def main(spec, seeds, steps_list, ref_steps, batch, device):
    """Print the teacher NFE table (markdown) for an analytic teacher."""
    teacher = load_teacher(spec, device=device)
    if not hasattr(teacher, "component_of"):
        raise ConfigError(f"{spec} is not an analytic teacher: exact metrics need builtin:glyphs32 or glyphs16.")
    seed_list = parse_seeds(seeds)
    steps = [int(s) for s in steps_list.split(",")]
    latents, labels = draw_inputs(teacher, seed_list, torch.device(device))
    t0 = time.perf_counter()
    reference = reference_endpoints(teacher, latents, labels, num_steps=ref_steps, chunk=batch)
    ref_metrics = exact_metrics(teacher, reference, reference, labels)
    ref_row = (f"reference, {ref_steps} steps", 2 * ref_steps - 1, ref_metrics, time.perf_counter() - t0)
    rows = table_rows(teacher, latents, labels, reference, steps, batch)
    print(f"Teacher {spec}, {len(seed_list)} seeds ({seeds}), class labels "
          f"{'random per seed' if labels is not None else 'none'}; sampler outputs clamped to [-1, 1]; "
          f"device {device} "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)\n")
    print(format_table(rows, ref_row, ref_metrics["data_log_likelihood"]))


if __name__ == "__main__":
    main()  # pylint: disable=no-value-for-parameter
