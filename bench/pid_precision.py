"""Benchmark: rounding error of the PID residual under fp16/bf16 autocast, against the same residual in fp32.

The residual lhs − rhs, lhs = X − c·(X − X'), c = t/(t − t') (11–46 on the N = 250 Karras grid), rhs = D(X, t),
is computed for one z per grid index (every `--every`-th index of the N = 250 grid) in fp32, then under autocast
in each format with three student set-ups:
  amp, 16-bit output layers   the whole student under autocast, as before the output layers ran in fp32
  --residual-precision=amp    the student under autocast, its output layers (norm, SiLU, conv) in fp32
  --residual-precision=fp32   the student and the finite difference in fp32 (the default)
The teacher runs under autocast in all three. Networks: EDM's CIFAR-10 DDPM++ (edm-cifar10-32x32-uncond-vp,
56M parameters) and a tiny SongUNet, EDM-initialised, with random weights in the zero-initialised output conv so
that the output is of order 1 (the error depends on how rounding propagates, not on trained values).

    python bench/pid_precision.py                       # CPU, both networks
    python bench/pid_precision.py --nets=tiny --every=1 --device=cuda
"""

from __future__ import annotations

import contextlib
import time

import click
import torch

NETS = {"cifar10": ("edm-cifar10-32x32-uncond-vp", {}),
        "tiny": ("edm-cifar10-32x32-uncond-vp", dict(img_resolution=8, model_channels=16, channel_mult=[1, 2],
                                                      num_blocks=1, attn_resolutions=[4]))}
FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build(net: str, device: torch.device):
    """(teacher, student): an EDM teacher with random weights (output conv included) and its PID student."""
    import edm_networks
    from pid.methods.pid.student import student_from_teacher
    from pid.teachers import EDMTeacher
    name, overrides = NETS[net]
    torch.manual_seed(0)
    precond = edm_networks.build_preset(name, **overrides)
    with torch.no_grad():
        for key, p in precond.named_parameters():
            if ("aux_conv" in key or "out_conv" in key) and key.endswith("weight"):
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
    teacher = EDMTeacher(precond.eval().requires_grad_(False), name).to(device)
    return teacher, student_from_teacher(teacher, name).to(device).eval()


@contextlib.contextmanager
def sixteen_bit_output_layers():
    """The output layers under autocast like the rest (what the networks did before they ran them in fp32)."""
    import edm_networks.unets as unets
    saved = unets.output_in_fp32
    unets.output_in_fp32 = lambda layer, x: layer(x).float()   # round to 16 bits, hand on as float32
    try:
        yield
    finally:
        unets.output_in_fp32 = saved


def residual(teacher, student, z, n, mode: str, dtype) -> torch.Tensor:
    from pid.methods.pid import PIDObjective
    obj = PIDObjective(teacher, 250, "l2", 0.002, 80.0, residual_precision="fp32" if mode == "fp32" else "amp")
    before = sixteen_bit_output_layers() if mode == "amp16" else contextlib.nullcontext()
    with before, torch.no_grad(), torch.autocast(z.device.type, dtype=dtype or torch.float32,
                                                 enabled=dtype is not None):
        lhs, rhs = obj.residual(student, z, None, n)
    return lhs, rhs


def rms(a: torch.Tensor) -> float:
    return a.double().square().mean().sqrt().item()


@click.command()
@click.option("--nets", default="tiny,cifar10", help="Comma-separated: tiny, cifar10")
@click.option("--every", type=int, default=10, help="Use every k-th index of the N = 250 grid (1 = all 250)")
@click.option("--device", default="cpu")
def main(nets, every, device):
    """Print the markdown table of BENCHMARKS.md, 'Residual precision'."""
    device = torch.device(device)
    print("| network | format | student | residual error, rms | lhs error | rhs error | fp32 residual rms |")
    print("|---|---|---|---|---|---|---|")
    labels = {"amp16": "amp, 16-bit output layers", "amp": "`--residual-precision=amp`",
              "fp32": "`--residual-precision=fp32`"}
    for net in nets.split(","):
        teacher, student = build(net, device)
        n = torch.arange(0, 250, every, device=device)
        res = teacher.img_resolution
        z = torch.randn(len(n), 3, res, res, generator=torch.Generator().manual_seed(0)).to(device) * 80
        t0 = time.time()
        lhs32, rhs32 = residual(teacher, student, z, n, "fp32", None)
        r32 = lhs32 - rhs32
        for fmt, dtype in FORMATS.items():
            for mode in ("amp16", "amp", "fp32"):
                lhs, rhs = residual(teacher, student, z, n, mode, dtype)
                print(f"| {net} | {fmt} | {labels[mode]} | {rms(lhs - rhs - r32):.1e} | {rms(lhs - lhs32):.1e} | "
                      f"{rms(rhs - rhs32):.1e} | {rms(r32):.2f} |", flush=True)
        print(f"<!-- {net}: {len(n)} grid indices, {time.time() - t0:.0f} s on {device} -->")


if __name__ == "__main__":
    main()
