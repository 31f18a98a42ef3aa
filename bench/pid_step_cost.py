"""Benchmark (b): cost of one PID training step for the full-size reference configurations.

For the CIFAR-10 DDPM++ (edm-cifar10-32x32-uncond-vp, 56M parameters) and ImageNet-64 ADM
(edm-imagenet-64x64-cond-adm, 296M) teachers with random weights (the cost does not depend on the values), at
a small batch: time of the teacher forward (no grad), the student forward + backward (one call on 2B), the
distance forward + backward (LPIPS at 224 px with a random VGG16 of the right shape, or L2), and the peak
memory per sample. Each configuration runs in a fresh process so that peak-memory numbers do not mix.

    python bench/pid_step_cost.py                       # both networks, LPIPS, batch 2, 3 timed steps
    python bench/pid_step_cost.py --nets=cifar10 --batch=4 --distance=l2
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import click
import torch

NETS = {"cifar10": "edm-cifar10-32x32-uncond-vp", "imagenet64": "edm-imagenet-64x64-cond-adm"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(net: str, batch: int, distance: str, repeats: int, device: torch.device) -> dict:
    """Run `repeats` timed PID steps (after one warm-up) in this process; returns mean seconds per part."""
    import edm_networks
    from pid.distances import DistanceConfig, write_random_vgg16
    from pid.methods.pid import PIDObjective
    from pid.methods.pid.student import student_from_teacher
    from pid.teachers import EDMTeacher
    torch.manual_seed(0)
    teacher = EDMTeacher(edm_networks.build_preset(NETS[net]).eval().requires_grad_(False), NETS[net]).to(device)
    student = student_from_teacher(teacher, NETS[net]).to(device).train()
    with tempfile.TemporaryDirectory() as tmp:
        vgg = write_random_vgg16(os.path.join(tmp, "vgg16.pth")) if distance == "lpips" else None
        cfg = DistanceConfig(distance, lpips_vgg=vgg)
        method = PIDObjective(teacher, 250, cfg).to(device)
    shape = (student.img_channels, student.img_resolution, student.img_resolution)
    gen = torch.Generator(device=device).manual_seed(0)
    base = _peak_bytes(device)
    parts = {"teacher_fwd": 0.0, "student_fwd_bwd": 0.0, "distance_fwd_bwd": 0.0, "step": 0.0}
    for it in range(repeats + 1):
        z, labels, n = method.draw(batch, shape, student.label_dim, gen, device)
        timer = {}
        _sync(device); t0 = time.perf_counter()
        grid = method.grid.to(device)
        t, t2 = grid[n], grid[(n + 1).clamp(max=method.num_steps - 1)]
        both = student(torch.cat([z, z]), torch.cat([t, t2]), None if labels is None else torch.cat([labels] * 2))
        x, x2 = both.chunk(2)
        lhs = x - t.view(-1, 1, 1, 1) * (x - x2) / (t - t2).view(-1, 1, 1, 1)
        _sync(device); t1 = time.perf_counter()
        with torch.no_grad():
            rhs = teacher(x.detach(), t, labels)
        _sync(device); t2_ = time.perf_counter()
        leaf = lhs.detach().requires_grad_(True)
        method.distance(leaf, rhs).sum().backward()
        _sync(device); t3 = time.perf_counter()
        lhs.backward(leaf.grad)
        student.zero_grad(set_to_none=True)
        _sync(device); t4 = time.perf_counter()
        timer = {"teacher_fwd": t2_ - t1, "student_fwd_bwd": (t1 - t0) + (t4 - t3), "distance_fwd_bwd": t3 - t2_,
                 "step": t4 - t0}
        if it > 0:  # the first step is a warm-up (allocator, lazy init)
            for k, v in timer.items():
                parts[k] += v / repeats
    peak = _peak_bytes(device) - base
    return {"net": net, "params": sum(p.numel() for p in student.parameters()), "batch": batch,
            "distance": distance, **parts, "peak_mib_per_sample": peak / batch / 2 ** 20, "device": str(device),
            "threads": torch.get_num_threads()}


def measure_in_subprocess(script: str, args: list[str]) -> dict:
    """Run `script args --one` in a fresh process (each row's peak memory starts from zero) and return the JSON
    dict of its last output line."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.abspath(script), *args, "--one"], capture_output=True, text=True,
                         check=True, cwd=repo)
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.option("--nets", default="cifar10,imagenet64", help="Comma-separated: cifar10, imagenet64")
@click.option("--batch", type=int, default=2, help="Images per step (the student runs on 2x this)")
@click.option("--distance", type=click.Choice(["lpips", "l2"]), default="lpips")
@click.option("--repeats", type=int, default=3, help="Timed steps after one warm-up")
@click.option("--device", default="cpu")
@click.option("--one", is_flag=True, hidden=True, help="Measure the single net in --nets in this process")
def main(nets, batch, distance, repeats, device, one):
    """Print a markdown table of PID step costs."""
    if one:
        print(json.dumps(measure(nets, batch, distance, repeats, torch.device(device))))
        return
    rows = [measure_in_subprocess(__file__, [f"--nets={net}", f"--batch={batch}", f"--distance={distance}",
                                             f"--repeats={repeats}", f"--device={device}"])
            for net in nets.split(",")]
    print(f"| network | params | batch | distance | teacher fwd (s) | student fwd+bwd, 2B (s) | distance fwd+bwd (s) "
          f"| step (s) | peak memory per sample (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {NETS[r['net']]} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['distance']} | {r['teacher_fwd']:.3f} "
              f"| {r['student_fwd_bwd']:.3f} | {r['distance_fwd_bwd']:.3f} | {r['step']:.3f} "
              f"| {r['peak_mib_per_sample']:.0f} |")
    print(f"\ndevice {rows[0]['device']}, {rows[0]['threads']} torch threads, {repeats} timed steps after 1 warm-up")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
