"""A/B: the CPU cost of a PID training step in two checkouts of this project, measured alternately in one run.

Two measurements per checkout and round, each in a fresh process (peak memory must not mix):
  parts    `bench/pid_step_cost.py --one` of that checkout: student fwd+bwd on 2B, teacher, LPIPS (no trainer);
  trainer  `pid.training.loop.Trainer.train_step()` of that checkout: the whole optimizer step (autocast off,
           RAdam, three EMAs), i.e. everything the trainer adds, with the speed options at their defaults.
The checkouts alternate (A, B, then B, A, ...) so that a change in the machine's load hits both; the table gives each
round's B/A ratio of step time and peak memory per sample, and their medians. On a machine shared with other jobs
wall time swings by tens of percent; CPU time (of the timed steps for `trainer`, of the whole process, model
building included, for `parts`) is much steadier and is given beside it.

    python bench/ab_step_cost.py --a=../main --b=. --rounds=2           # CIFAR-10 DDPM++, batch 4, LPIPS, fp32
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import click


def trainer_step(repo: str, net: str, batch: int, repeats: int) -> dict:
    """Mean seconds of `repeats` Trainer.train_step() calls after one warm-up, in checkout `repo`."""
    sys.path.insert(0, repo)
    import torch
    import edm_networks
    from pid.distances import DistanceConfig, write_random_vgg16
    from pid.methods.pid import PIDObjective
    from pid.methods.pid.student import student_from_teacher
    from pid.teachers import EDMTeacher
    from pid.training import TrainConfig
    from pid.training.distributed import DistInfo
    from pid.training.loop import Trainer
    import pid
    for module in (edm_networks, pid):   # this checkout's code, not an installed copy
        assert os.path.abspath(module.__file__).startswith(os.path.abspath(repo) + os.sep), module.__file__
    torch.manual_seed(0)
    name = {"cifar10": "edm-cifar10-32x32-uncond-vp", "imagenet64": "edm-imagenet-64x64-cond-adm"}[net]
    teacher = EDMTeacher(edm_networks.build_preset(name).eval().requires_grad_(False), name)
    student = student_from_teacher(teacher, name)
    with tempfile.TemporaryDirectory() as tmp:
        method = PIDObjective(teacher, 250, DistanceConfig("lpips", lpips_vgg=write_random_vgg16(f"{tmp}/vgg.pth")))
        config = TrainConfig(outdir=tmp, steps=100, batch=batch, device="cpu")
        dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        trainer = Trainer(config, method, student, dist, tmp, {}, None)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        trainer.train_step()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            trainer.train_step()
        step, cpu = (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"step": step, "cpu": cpu, "peak_mib_per_sample": peak / batch / 2 ** 20,
            "threads": torch.get_num_threads()}


def _run(cmd: list, cwd: str) -> dict:
    """The JSON line the command prints, plus `process_cpu`: the child's whole CPU time (build included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_cpu"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return row


@click.command()
@click.option("--a", "repo_a", default=None, help="Checkout A (the baseline), e.g. ../main  [required]")
@click.option("--b", "repo_b", default=".", help="Checkout B (the change)")
@click.option("--net", type=click.Choice(["cifar10", "imagenet64"]), default="cifar10")
@click.option("--batch", type=int, default=4)
@click.option("--repeats", type=int, default=2, help="Timed steps per process after one warm-up")
@click.option("--rounds", type=int, default=2, help="A/B alternations per measurement")
@click.option("--only", type=click.Choice(["parts", "trainer"]), default=None, help="One of the two measurements")
@click.option("--one-trainer", "one", default=None, hidden=True, help="Measure the trainer step of this checkout")
def main(repo_a, repo_b, net, batch, repeats, rounds, only, one):
    """Print a markdown table of B/A step-time and peak-memory ratios."""
    if one:
        print(json.dumps(trainer_step(one, net, batch, repeats)))
        return
    if repo_a is None:
        raise click.UsageError("give --a, the baseline checkout")
    repos = {"A": os.path.abspath(repo_a), "B": os.path.abspath(repo_b)}
    kinds = (only,) if only else ("parts", "trainer")
    results = {(kind, k): [] for kind in kinds for k in repos}
    for r in range(rounds):
        for kind in kinds:
            for k in ("A", "B") if r % 2 == 0 else ("B", "A"):   # odd rounds start with B: no order bias
                repo = repos[k]
                if kind == "parts":
                    cmd = [sys.executable, os.path.join(repo, "bench", "pid_step_cost.py"), f"--nets={net}",
                           f"--batch={batch}", "--distance=lpips", f"--repeats={repeats}", "--one"]
                else:
                    cmd = [sys.executable, os.path.abspath(__file__), f"--net={net}", f"--batch={batch}",
                           f"--repeats={repeats}", f"--one-trainer={repo}"]
                results[(kind, k)].append(_run(cmd, repo))
                row = results[(kind, k)][-1]
                cpu = row.get("cpu", row["process_cpu"])
                print(f"round {r} {kind} {k}: step {row['step']:.3f} s, CPU {cpu:.3f} s, "
                      f"peak {row['peak_mib_per_sample']:.0f} MiB/sample", file=sys.stderr, flush=True)
    print(f"| measurement | A step (s) | B step (s) | B/A time per round | B/A time, median | B/A CPU time per round "
          f"| B/A CPU time, median | A MiB/sample | B MiB/sample | B/A memory, median |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind in kinds:
        a, b = results[(kind, "A")], results[(kind, "B")]
        ratios = [y["step"] / x["step"] for x, y in zip(a, b)]
        key = "cpu" if kind == "trainer" else "process_cpu"
        cpu = [y[key] / x[key] for x, y in zip(a, b)]
        mem = [y["peak_mib_per_sample"] / x["peak_mib_per_sample"] for x, y in zip(a, b)]
        print(f"| {kind} | {statistics.median(x['step'] for x in a):.3f} "
              f"| {statistics.median(y['step'] for y in b):.3f} | {', '.join(f'{v:.3f}' for v in ratios)} "
              f"| {statistics.median(ratios):.3f} | {', '.join(f'{v:.3f}' for v in cpu)} "
              f"| {statistics.median(cpu):.3f} "
              f"| {statistics.median(x['peak_mib_per_sample'] for x in a):.0f} "
              f"| {statistics.median(y['peak_mib_per_sample'] for y in b):.0f} | {statistics.median(mem):.3f} |")
    print(f"\n{net}, batch {batch}, LPIPS, fp32, {repeats} timed steps after 1 warm-up per process, {rounds} rounds "
          f"A,B alternating; A = {repos['A']}, B = {repos['B']}; threads: {results[(kinds[0], 'A')][0]['threads']}")


if __name__ == "__main__":
    main()
