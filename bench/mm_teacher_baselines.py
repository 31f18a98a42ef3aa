"""Teacher baselines for moment matching: EDM's Heun sampler vs MM's ancestral sampler, scored as distributions.

For an analytic teacher (default `builtin:glyphs16`) and seeds 0..N-1 (EDM's per-seed latents and random class
labels; the ancestral sampler's noise from the same per-seed generators, drawn after them), prints a markdown
table of `pid.exact_eval.distribution_metrics`: Fréchet distance in pixel space to the exact target moments,
total variation of the mixture-component frequencies, and the RMS distance to the nearest component mean (the
data's value is the component std), plus the floor exact data samples reach at the same N and labels. Images
are scored as the samplers return them (not clamped to [-1, 1]), like the exact data they are compared with.
Distilled students (MM with their own k, PID with one call) join the same table with --student NAME=PATH
(repeatable); --no-teacher leaves the teacher rows out.

    python bench/mm_teacher_baselines.py --num=2000
    python bench/mm_teacher_baselines.py --no-teacher --student "MM k=4=runs/.../student-0002000.pt"
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid.cli import user_errors  # noqa: E402
from pid.errors import ConfigError  # noqa: E402
from pid.exact_eval import distribution_metrics, heun_endpoints  # noqa: E402
from pid.metrics.evaluate import generate_seeds, seed_draws, seed_inputs  # noqa: E402
from pid.samplers import ancestral_sampler  # noqa: E402
from pid.teachers import load_teacher  # noqa: E402


def _shape(teacher):
    return [teacher.img_channels, teacher.img_resolution, teacher.img_resolution]


def heun_images(teacher, seeds, steps: int, batch: int, device):
    """Deterministic Heun (S_churn 0, NFE 2*steps-1) from the seeds' latents: (float64 images, labels)."""
    latents, labels = seed_inputs(seeds, _shape(teacher), teacher.label_dim, device)
    return heun_endpoints(teacher, latents, labels, steps, batch), labels


def ancestral_images(teacher, seeds, k: int, batch: int, device, rho: float = 7.0):
    """MM's Algorithm 1 with k steps on the ρ map, per-seed noise after each seed's latents and label."""
    images, labels = [], []
    for start in range(0, len(seeds), batch):
        rnd, z, c = seed_draws(seeds[start:start + batch], _shape(teacher), teacher.label_dim, device)
        images.append(ancestral_sampler(teacher, z, c, randn_like=rnd.randn_like, num_steps=k, rho=rho))
        labels.append(c)
    return torch.cat(images), None if labels[0] is None else torch.cat(labels)


def student_images(path: str, seeds, batch: int, device):
    """A student checkpoint's images for the seeds (MM: its own k with per-seed noise; PID: one call), NFE."""
    from pid.training.checkpoint import read_student_checkpoint
    spec = read_student_checkpoint(path)["spec"]
    if spec.get("class") == "MMStudent":
        from pid.methods.mm import load_mm_student
        student, nfe = load_mm_student(path, device=device), spec["k"]
    else:
        from pid.methods.pid import load_student
        student, nfe = load_student(path, device=device), 1
    images, labels = [], []
    for start in range(0, len(seeds), batch):
        x, c = generate_seeds(student, seeds[start:start + batch], _shape(student), device)
        images.append(x.double())
        labels.append(c)
    return torch.cat(images), None if labels[0] is None else torch.cat(labels), nfe


def format_table(rows, floor) -> str:
    lines = ["| sampler | NFE | fd_exact | component_tv | rms_to_mean | time (s) |", "|---|---:|---:|---:|---:|---:|"]
    for name, nfe, m, secs in rows:
        lines.append(f"| {name} | {nfe} | {m['fd_exact']:.4f} | {m['component_tv']:.4f} | "
                     f"{m['rms_to_mean']:.4f} | {secs:.1f} |")
    lines.append(f"| exact data | – | {floor['data_fd_exact']:.4f} | {floor['data_component_tv']:.4f} | "
                 f"{floor['data_rms_to_mean']:.4f} | – |")
    return "\n".join(lines)


@click.command()
@click.option("--teacher", "spec", default="builtin:glyphs16", show_default=True, help="An analytic teacher")
@click.option("--num", type=click.IntRange(min=2), default=2000, show_default=True, help="Seeds 0..num-1")
@click.option("--heun-steps", default="1,2,3,5,9,18,40", show_default=True, help="Heun steps (NFE = 2*steps-1)")
@click.option("--ancestral-steps", default="1,2,4,8,16,32", show_default=True, help="Ancestral k (NFE = k)")
@click.option("--ancestral-rho", default="7", show_default=True, help="ρ of the ancestral t→σ map (comma list)")
@click.option("--batch", type=click.IntRange(min=1), default=500, show_default=True, help="Images per call")
@click.option("--device", default="cpu", show_default=True, help="torch device")
@click.option("--student", "students", multiple=True, help="NAME=PATH of a student checkpoint to add (repeatable)")
@click.option("--no-teacher", is_flag=True, help="Only the students' rows")
@user_errors
def main(spec, num, heun_steps, ancestral_steps, ancestral_rho, batch, device, students, no_teacher):
    """Print the Heun-vs-ancestral teacher table (markdown) for an analytic teacher, and students beside it."""
    teacher = load_teacher(spec, device=device)
    if not hasattr(teacher, "component_of"):
        raise ConfigError(f"{spec} is not an analytic teacher: exact metrics need builtin:glyphs32 or glyphs16.")
    seeds, dev = list(range(num)), torch.device(device)
    runs = [("Heun", s, 2 * s - 1, heun_images) for s in map(int, heun_steps.split(","))]
    for rho in map(float, ancestral_rho.split(",")):
        sample = lambda t, s, k, b, d, rho=rho: ancestral_images(t, s, k, b, d, rho)  # noqa: E731
        runs += [(f"ancestral ρ={rho:g}", k, k, sample) for k in map(int, ancestral_steps.split(","))]
    runs = [] if no_teacher else runs
    rows, floor = [], None
    for item in students:
        name, _, path = item.rpartition("=")
        if not name:
            raise ConfigError(f"--student expects NAME=PATH, got {item!r}")
        t0 = time.perf_counter()
        images, labels, nfe = student_images(path, seeds, batch, dev)
        m = distribution_metrics(teacher, images, labels)
        floor = floor or m
        rows.append((name, nfe, m, time.perf_counter() - t0))
    for name, steps, nfe, sample in runs:
        t0 = time.perf_counter()
        images, labels = sample(teacher, seeds, steps, batch, dev)
        m = distribution_metrics(teacher, images, labels)
        floor = floor or m  # the data floor depends only on N and the labels: the same for every row
        rows.append((f"{name}, {steps} steps", nfe, m, time.perf_counter() - t0))
    print(f"{spec}, seeds 0-{num - 1}, torch {torch.__version__}, device {device}\n")
    print(format_table(rows, floor))


if __name__ == "__main__":
    main()  # pylint: disable=no-value-for-parameter
