"""Benchmark (a): the default `train_pid.py` run's one-step student placed in the teacher's NFE table.

Runs `python train_pid.py --outdir=<outdir>` (no other option: the embedded default, built-in glyph teacher),
times it, then scores every `student-<step>.pt` of the run and EDM's deterministic Heun sampler at several NFE
on the same seeds against the exact ODE endpoints (Heun, 512 steps, float64): RMSE, mixture-component accuracy
and log-likelihood under the true mixture (pid.exact_eval). Latents and labels are EDM's per-seed draws.

    python bench/pid_default_run.py --outdir=bench-runs              # train (≤ 15 min on 2 idle cores) + table
    python bench/pid_default_run.py --run-dir=runs/00000-pid-...      # score an existing run
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time

import click
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_default(outdir: str, extra: tuple[str, ...]) -> tuple[str, float]:
    """Run the default training in a subprocess; returns (run directory, wall seconds)."""
    cmd = [sys.executable, os.path.join(REPO, "train_pid.py"), f"--outdir={outdir}", *extra]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.time() - t0
    if out.returncode != 0:
        raise SystemExit(f"training failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    run_dir = re.findall(r"run directory: (.+)", out.stdout)[-1].strip()
    return run_dir, wall


def score_rows(run_dir: str, num: int, nfes: tuple[int, ...],
               emas: tuple[str | None, ...] = (None,)) -> tuple[list[dict], dict]:
    """Rows of the table: teacher Heun at each NFE, then the student at every snapshot (each EMA in `emas`;
    None: the checkpoint's default EMA)."""
    from pid.exact_eval import exact_metrics, reference_endpoints
    from pid.metrics.evaluate import seed_inputs
    from pid.samplers import edm_sampler
    from pid.methods.pid.student import load_student
    from pid.teachers import load_teacher
    config = json.load(open(os.path.join(run_dir, "config.json")))
    teacher = load_teacher(config["extra"]["pid"]["teacher"])
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    latents, labels = seed_inputs(list(range(num)), shape, teacher.label_dim, torch.device("cpu"))
    lat64, lab64 = latents.double(), None if labels is None else labels.double()
    reference = reference_endpoints(teacher, lat64, lab64, num_steps=512)
    rows = []
    for nfe in nfes:
        steps = (nfe + 1) // 2
        images = edm_sampler(teacher, lat64, lab64, num_steps=steps).clamp(-1, 1)
        rows.append({"what": f"teacher Heun, {steps} steps", "nfe": nfe, **exact_metrics(teacher, images, reference, lab64)})
    for path in sorted(glob.glob(os.path.join(run_dir, "student-[0-9]*.pt"))):
        step = int(re.findall(r"student-(\d+)\.pt", path)[0])
        for ema in emas:
            student = load_student(path, ema=ema)
            with torch.no_grad():
                images = torch.cat([student.generate(latents[i:i + 250],
                                                     None if labels is None else labels[i:i + 250])
                                    for i in range(0, num, 250)]).double()
            what = f"PID student, step {step}" + (f", EMA {ema}" if ema is not None else "")
            rows.append({"what": what, "nfe": 1, **exact_metrics(teacher, images, reference, lab64)})
    return rows, config


@click.command()
@click.option("--outdir", default="bench-runs", help="Where the default run is written")
@click.option("--run-dir", default=None, help="Score this existing run instead of training")
@click.option("--num", type=int, default=1000, help="Seeds 0..num-1")
@click.option("--nfe", default="1,3,5,9,17,35", help="Teacher NFEs (Heun: NFE = 2·steps − 1)")
@click.option("--train-arg", multiple=True, help="Extra option for train_pid.py (repeatable)")
@click.option("--ema", default=None, help="Comma-separated EMA rates of the snapshots to score (e.g. 0.99,0.995) "
                                          "[default: each checkpoint's default EMA]")
def main(outdir, run_dir, num, nfe, train_arg, ema):
    """Train the default run (unless --run-dir) and print the markdown table."""
    from pid.errors import PidError
    from pid.training.config import ema_name
    try:  # before training, so that a typo does not cost the whole run
        emas = (None,) if ema is None else tuple(ema_name(float(v)) for v in ema.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{ema!r} is not a comma-separated list of EMA rates", param_hint="--ema")
    wall = None
    if run_dir is None:
        run_dir, wall = train_default(outdir, tuple(train_arg))
    try:
        rows, config = score_rows(run_dir, num, tuple(int(v) for v in nfe.split(",")), emas)
    except PidError as e:
        raise SystemExit(f"error: {e}")
    print(f"| sampler | NFE | RMSE to exact endpoint | component accuracy | log-likelihood (nats) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['nfe']} | {r['rmse']:.4f} | {r['component_accuracy']:.3f} | {r['log_likelihood']:.1f} |")
    print(f"\ndata log-likelihood (exact samples): {rows[0]['data_log_likelihood']:.1f} nats; {num} seeds; "
          f"run {run_dir}" + (f"; training wall time {wall:.0f} s" if wall is not None else ""))
    print(f"torch threads {torch.get_num_threads()}, cpu count {os.cpu_count()}")


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main()
