"""Teacher baselines for moment matching: EDM's Heun sampler vs MM's ancestral sampler, scored as distributions.

For a built-in teacher (default `builtin:glyphs16`; the network teacher `builtin:glyphs16-net` is scored against
the mixture it learned) and seeds S..S+N-1 (`--seed0`, `--num`; EDM's per-seed latents and random class
labels; the ancestral sampler's noise from the same per-seed generators, drawn after them), prints a markdown
table of `pid.exact_eval.distribution_metrics`: Fréchet distance in pixel space to the exact target moments,
total variation of the mixture-component frequencies, and the RMS distance to the nearest component mean (the
data's value is the component std), plus the floor exact data samples reach at the same N and labels. Images
are scored as the samplers return them (not clamped to [-1, 1]), like the exact data they are compared with.
Distilled students (MM with their own k, PID with one call) join the same table with --student NAME=PATH
(repeatable); --no-teacher leaves the teacher rows out. `--ode` adds, for the deterministic rows (Heun, PID
students), the RMSE to the teacher's own ODE endpoint of the same noise (Heun with `--ref-steps` steps; for a
network teacher that is the network's ODE, not the mixture's) and the share of images on the endpoint's
component; `--ref-cache=FILE` keeps those endpoints between calls (they cost 2·ref_steps−1 calls per image).

    python bench/mm_teacher_baselines.py --num=2000
    python bench/mm_teacher_baselines.py --no-teacher --student "MM k=4=runs/.../student-0002000.pt"
    python bench/mm_teacher_baselines.py --teacher=builtin:glyphs16-net --seed0=1000000 --ode --ref-cache=ref.pt
"""

import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid.cli import user_errors  # noqa: E402
from pid.errors import ConfigError  # noqa: E402
from pid.exact_eval import (distribution_metrics, exact_metrics, heun_endpoints, reference_endpoints,  # noqa: E402
                            reference_steps)
from pid.metrics.evaluate import generate_seeds, seed_draws, seed_inputs  # noqa: E402
from pid.samplers import ancestral_sampler  # noqa: E402
from pid.teachers import data_distribution, load_teacher  # noqa: E402


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
    return torch.cat(images), None if labels[0] is None else torch.cat(labels), nfe, spec.get("class") != "MMStudent"


def ode_reference(teacher, seeds, steps: int, batch: int, device, cache):
    """The teacher's ODE endpoints of the seeds (Heun, `steps` steps), read from / written to `cache` if given."""
    key = dict(teacher=getattr(teacher, "name", ""), seeds=[seeds[0], len(seeds)], steps=steps)
    if cache and os.path.isfile(cache):
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            return saved["endpoints"]
    latents, labels = seed_inputs(seeds, _shape(teacher), teacher.label_dim, device)
    endpoints = reference_endpoints(teacher, latents, labels, num_steps=steps, chunk=batch)
    if cache:
        torch.save(dict(key=key, endpoints=endpoints.cpu()), cache)
    return endpoints


def format_table(rows, floor) -> str:
    ode = any("rmse" in r[2] for r in rows)
    lines = ["| sampler | NFE | fd_exact | component_tv | rms_to_mean |" + (" RMSE to ODE | same comp. |" if ode else "")
             + " time (s) |", "|---|---:|---:|---:|---:|" + ("---:|---:|" if ode else "") + "---:|"]
    for name, nfe, m, secs in rows:
        extra = ""
        if ode:
            extra = (f" {m['rmse']:.4f} | {100 * m['component_accuracy']:.1f}% |" if "rmse" in m else " – | – |")
        lines.append(f"| {name} | {nfe} | {m['fd_exact']:.4f} | {m['component_tv']:.4f} | "
                     f"{m['rms_to_mean']:.4f} |{extra} {secs:.1f} |")
    lines.append(f"| exact data | – | {floor['data_fd_exact']:.4f} | {floor['data_component_tv']:.4f} | "
                 f"{floor['data_rms_to_mean']:.4f} |" + (" – | – |" if ode else "") + " – |")
    return "\n".join(lines)


@click.command()
@click.option("--teacher", "spec", default="builtin:glyphs16", show_default=True, help="A built-in teacher")
@click.option("--num", type=click.IntRange(min=2), default=2000, show_default=True, help="Seeds seed0..seed0+num-1")
@click.option("--seed0", type=click.IntRange(min=0), default=0, show_default=True, help="First seed")
@click.option("--ode", is_flag=True, help="Also RMSE / component agreement with the teacher's ODE endpoints")
@click.option("--ref-steps", type=click.IntRange(min=2), default=None,
              help="--ode: Heun steps of the reference endpoints  [default: 512 analytic, 64 network teachers]")
@click.option("--ref-cache", default=None, help="--ode: file that keeps the reference endpoints")
@click.option("--heun-steps", default="1,2,3,5,9,18,40", show_default=True, help="Heun steps (NFE = 2*steps-1)")
@click.option("--ancestral-steps", default="1,2,4,8,16,32", show_default=True, help="Ancestral k (NFE = k)")
@click.option("--ancestral-rho", default="7", show_default=True, help="ρ of the ancestral t→σ map (comma list)")
@click.option("--batch", type=click.IntRange(min=1), default=500, show_default=True, help="Images per call")
@click.option("--device", default="cpu", show_default=True, help="torch device")
@click.option("--student", "students", multiple=True, help="NAME=PATH of a student checkpoint to add (repeatable)")
@click.option("--no-teacher", is_flag=True, help="Only the students' rows")
@user_errors
def main(spec, num, seed0, ode, ref_steps, ref_cache, heun_steps, ancestral_steps, ancestral_rho, batch, device,
         students, no_teacher):
    """Print the Heun-vs-ancestral teacher table (markdown) for a built-in teacher, and students beside it."""
    teacher = load_teacher(spec, device=device)
    mixture = data_distribution(teacher)
    if mixture is None:
        raise ConfigError(f"{spec} is not a built-in teacher: exact metrics need a known mixture (builtin:<name>).")
    seeds, dev = list(range(seed0, seed0 + num)), torch.device(device)
    ref_steps = ref_steps or reference_steps(teacher)
    reference = ode_reference(teacher, seeds, ref_steps, batch, dev, ref_cache) if ode else None

    def score(images, labels, deterministic):
        m = distribution_metrics(mixture, images, labels)
        if reference is not None and deterministic:
            m.update(exact_metrics(mixture, images.clamp(-1, 1), reference, labels))
        return m
    runs = [("Heun", s, 2 * s - 1, heun_images, True) for s in map(int, heun_steps.split(","))]
    for rho in map(float, ancestral_rho.split(",")):
        sample = lambda t, s, k, b, d, rho=rho: ancestral_images(t, s, k, b, d, rho)  # noqa: E731
        runs += [(f"ancestral ρ={rho:g}", k, k, sample, False) for k in map(int, ancestral_steps.split(","))]
    runs = [] if no_teacher else runs
    rows, floor = [], None
    for item in students:
        name, _, path = item.rpartition("=")
        if not name:
            raise ConfigError(f"--student expects NAME=PATH, got {item!r}")
        t0 = time.perf_counter()
        images, labels, nfe, deterministic = student_images(path, seeds, batch, dev)
        m = score(images, labels, deterministic)
        floor = floor or m
        rows.append((name, nfe, m, time.perf_counter() - t0))
    for name, steps, nfe, sample, deterministic in runs:
        t0 = time.perf_counter()
        images, labels = sample(teacher, seeds, steps, batch, dev)
        m = score(images, labels, deterministic)
        floor = floor or m  # the data floor depends only on N and the labels: the same for every row
        rows.append((f"{name}, {steps} steps", nfe, m, time.perf_counter() - t0))
    print(f"{spec}, seeds {seeds[0]}-{seeds[-1]}, torch {torch.__version__}, device {device}"
          + (f"; ODE reference: Heun {ref_steps} steps" if ode else "") + "\n")
    print(format_table(rows, floor))


if __name__ == "__main__":
    main()  # pylint: disable=no-value-for-parameter
