"""Benchmark (c): one-step PID sampling throughput against the teacher's 35-NFE Heun sampler, same network.

The student is built from the teacher (same U-Net, random weights: throughput does not depend on the values),
so the ratio is the cost of 1 network call against EDM's deterministic 18-step Heun (NFE 35).

    python bench/pid_sampling.py                              # CIFAR-10 DDPM++ on CPU, batch 8
    python bench/pid_sampling.py --net=imagenet64 --batch=2 --device=cuda
"""

from __future__ import annotations

import os
import sys
import time

import click
import torch

NETS = {"cifar10": "edm-cifar10-32x32-uncond-vp", "imagenet64": "edm-imagenet-64x64-cond-adm",
        "glyphs16": None}


def _teacher(net: str, device: torch.device):
    import edm_networks
    from pid.teachers import EDMTeacher
    torch.manual_seed(0)
    if NETS[net] is None:  # the glyphs16 student preset wrapped as an EDM teacher of the same size
        from pid.student_presets import PRESETS
        preset = PRESETS["glyphs16"]
        precond = edm_networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10,
                                          model_type=preset["class"], sigma_min=0.002, sigma_max=80,
                                          **preset["kwargs"])
        return EDMTeacher(precond.eval().requires_grad_(False), "glyphs16-preset").to(device)
    return EDMTeacher(edm_networks.build_preset(NETS[net]).eval().requires_grad_(False), NETS[net]).to(device)


def _rate(fn, batch: int, repeats: int, device: torch.device) -> float:
    """Images per second of `fn()` (one batch per call), after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * repeats / (time.perf_counter() - t0)


@click.command()
@click.option("--net", type=click.Choice(sorted(NETS)), default="cifar10")
@click.option("--batch", type=int, default=8)
@click.option("--repeats", type=int, default=3, help="Timed batches (one-step); the Heun sampler gets 1")
@click.option("--device", default="cpu")
def main(net, batch, repeats, device):
    """Print a markdown table: images/s of the one-step student and of the 35-NFE teacher."""
    from pid.samplers import edm_sampler
    from pid.methods.pid.student import student_from_teacher
    device = torch.device(device)
    teacher = _teacher(net, device)
    student = student_from_teacher(teacher, "bench").to(device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    latents = torch.randn(shape, generator=gen, device=device)
    labels = None
    if teacher.label_dim:
        labels = torch.eye(teacher.label_dim, device=device)[torch.randint(teacher.label_dim, (batch,),
                                                                          generator=gen, device=device)]
    with torch.no_grad():
        one = _rate(lambda: student.generate(latents, labels), batch, repeats, device)
        heun = _rate(lambda: edm_sampler(teacher, latents, labels, num_steps=18), batch, 1, device)
    print("| network | sampler | NFE | images/s | speed-up |")
    print("|---|---|---|---|---|")
    print(f"| {NETS[net] or net} | EDM Heun (teacher) | 35 | {heun:.3g} | 1× |")
    print(f"| {NETS[net] or net} | PID student | 1 | {one:.3g} | {one / heun:.1f}× |")
    print(f"\ndevice {device}, batch {batch}, {torch.get_num_threads()} torch threads")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
