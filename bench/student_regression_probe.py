"""Capacity probe: the PID student network trained by plain regression onto exact ODE endpoints (built-in teachers).

This is not distillation and not part of the product. It answers one question about the default PID run: can the
student preset represent the teacher's noise-to-image map at all, and how fast does it learn it when it is given
the answers? The student (same preset, same random init, same Adam/EMA settings as the default PID recipe) is
trained at t = σ_min only, with the L2 loss between x_θ(z, σ_min) and the endpoint of z's probability-flow ODE
(EDM's deterministic Heun, float64, `--target-steps` steps; 18 steps already land on the exact component for every
seed, see BENCHMARKS.md). Every sample is fresh (steps × batch latents, drawn once). Each step costs one student
forward + backward on `--batch` images, half of a PID step (which evaluates the student on 2B).

It prints, every `--eval-every` steps, the component accuracy of the EMA and of the raw weights on seeds
0..num-1 (EDM's per-seed latents and labels, as `bench/pid_default_run.py`) and the EMA's RMSE to the exact endpoint.

    OMP_NUM_THREADS=1 python bench/student_regression_probe.py --steps=4000
"""

from __future__ import annotations

import copy
import os
import sys
import time

import click
import torch


@click.command()
@click.option("--teacher", default="builtin:glyphs16", show_default=True)
@click.option("--preset", default=None, help="student preset  [default: the teacher's default]")
@click.option("--steps", type=int, default=4000, show_default=True)
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=6e-3, show_default=True)
@click.option("--betas", default="0.9,0.99", show_default=True)
@click.option("--ema", type=float, default=0.995, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="init and data seed")
@click.option("--target-steps", type=int, default=24, show_default=True, help="Heun steps of the training targets")
@click.option("--eval-every", type=int, default=500, show_default=True)
@click.option("--num", type=int, default=1000, show_default=True, help="evaluation seeds 0..num-1")
def main(teacher, preset, steps, batch, lr, betas, ema, seed, target_steps, eval_every, num):
    from pid.exact_eval import exact_metrics, heun_endpoints, reference_endpoints
    from pid.metrics.evaluate import seed_inputs
    from pid.methods.pid.student import student_from_teacher
    from pid.teachers import load_teacher
    from pid.training.ema import EMAs
    spec = teacher
    teacher = load_teacher(spec)
    if not hasattr(teacher, "component_of"):
        raise SystemExit("this probe needs a built-in analytic teacher (builtin:<name>)")
    student = student_from_teacher(teacher, spec, preset=preset, seed=seed).train()
    shape = (student.img_channels, student.img_resolution, student.img_resolution)
    gen = torch.Generator().manual_seed(1000 + seed)
    n = steps * batch
    latents = torch.randn((n, *shape), generator=gen)
    labels = torch.eye(student.label_dim)[torch.randint(student.label_dim, (n,), generator=gen)] \
        if student.label_dim else None
    t0 = time.time()
    targets = heun_endpoints(teacher, latents.double(), None if labels is None else labels.double(),
                             num_steps=target_steps, chunk=8192).float()
    print(f"{n} training targets in {time.time() - t0:.0f} s", flush=True)
    val_lat, val_lab = seed_inputs(list(range(num)), shape, student.label_dim, torch.device("cpu"))
    val_lab64 = None if val_lab is None else val_lab.double()
    val_ref = reference_endpoints(teacher, val_lat.double(), val_lab64)
    b1, b2 = (float(v) for v in betas.split(","))
    opt = torch.optim.Adam(student.parameters(), lr=lr, betas=(b1, b2), foreach=True)
    emas = EMAs(student, [ema])
    averaged = copy.deepcopy(student).eval().requires_grad_(False)  # holds the EMA weights for evaluation

    def score(module):
        with torch.no_grad():
            return exact_metrics(teacher, module.generate(val_lat, val_lab), val_ref, val_lab64)

    print(f"| step | EMA {ema} component accuracy | raw weights | EMA RMSE to the exact endpoint |")
    print("|---|---|---|---|")
    for step in range(1, steps + 1):
        sl = slice((step - 1) * batch, step * batch)
        out = student(latents[sl] * student.sigma_max, student.sigma_min, None if labels is None else labels[sl])
        loss = (out - targets[sl]).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        emas.update(student)
        if step % eval_every == 0 or step == steps:
            averaged.load_state_dict(next(iter(emas.state_dict().values())))
            ema_metrics, raw_metrics = score(averaged), score(student.eval())
            student.train()
            print(f"| {step} | {ema_metrics['component_accuracy']:.3f} | {raw_metrics['component_accuracy']:.3f} "
                  f"| {ema_metrics['rmse']:.4f} |", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
