"""Step time of `--grad-sync=ddp` against `--grad-sync=manual` under torchrun, alternating in one run.

Each run is `torchrun --nproc_per_node=N train_pid.py ... --grad-sync=MODE --log-every=1`; the step time is the
median of `sec_per_step` in its stats.jsonl after the first `--skip` steps (warm-up). Runs alternate (ddp, manual,
ddp, manual, ...) so that a change in the machine's load hits both.

    python bench/grad_sync_cost.py                                  # 2 gloo processes on CPU, built-in teacher
    python bench/grad_sync_cost.py --nproc=8 --device=cuda --train-args="--preset=cifar10 --batch=512 --steps=60"
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

import click

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ARGS = ("--teacher=builtin:glyphs16 --batch=32 --batch-gpu=8 --steps=30 --grid-every=0 --eval-every=0 "
            "--snap=0 --device=cpu")


def step_time(nproc: int, mode: str, train_args: str, skip: int, outdir: str) -> float:
    """Median seconds per optimizer step of one torchrun run with `--grad-sync=mode`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, "train_pid.py"), f"--outdir={outdir}", f"--grad-sync={mode}", "--log-every=1",
           *shlex.split(train_args)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (run,) = os.listdir(outdir)
    rows = [json.loads(line) for line in open(os.path.join(outdir, run, "stats.jsonl"))]
    return statistics.median(r["sec_per_step"] for r in rows[skip:])


@click.command()
@click.option("--nproc", type=int, default=2)
@click.option("--device", default="cpu", help="cpu (gloo) or cuda (NCCL): picks the default --train-args")
@click.option("--train-args", default=None, help=f"train_pid.py options  [default on cpu: {CPU_ARGS}]")
@click.option("--rounds", type=int, default=2, help="ddp/manual alternations")
@click.option("--skip", type=int, default=5, help="Warm-up steps left out of the median")
def main(nproc, device, train_args, rounds, skip):
    """Print a markdown table of median step times per mode and round."""
    if train_args is None:
        if device != "cpu":
            raise click.ClickException("give --train-args for a GPU run (e.g. --preset=cifar10 --steps=60)")
        train_args = CPU_ARGS
    times = {"ddp": [], "manual": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for mode in times:
                times[mode].append(step_time(nproc, mode, train_args, skip, os.path.join(tmp, f"{mode}{r}")))
                print(f"round {r} {mode}: {times[mode][-1]:.4f} s/step", file=sys.stderr, flush=True)
    print("| grad sync | s/step per round | median |")
    print("|---|---|---|")
    for mode, values in times.items():
        print(f"| {mode} | {', '.join(f'{v:.4f}' for v in values)} | {statistics.median(values):.4f} |")
    ratio = statistics.median(times["ddp"]) / statistics.median(times["manual"])
    print(f"\nddp / manual: {ratio:.3f}; {nproc} processes, train_pid.py {train_args}")


if __name__ == "__main__":
    main()
