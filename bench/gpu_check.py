"""GPU check: the numbers a GPU owner records in BENCHMARKS.md, from one command (under 5 minutes on one GPU).

For the CIFAR-10 (DDPM++, 56M parameters) and ImageNet-64 (ADM, 296M) PID configurations, with random weights
(speed does not depend on the values), the recipes' per-GPU batches (64 and 32), LPIPS (average-pooled, as the
presets) and, by default, the student and its finite difference in fp32 under fp16/bf16 (the recipes'
`--residual-precision=fp32`; `--residual-precision=amp` puts them under autocast too):
  1. the trainer's real optimizer step (pid.training.loop.Trainer.train_step: autocast, GradScaler, RAdam, three
     EMAs) in fp32 / fp16 / bf16, without and with the fast paths (--attention=sdpa --channels-last=true, and
     --compile=true on the bf16 rows): images/s, peak GPU memory (total and per sample), and MFU = FLOPs of one
     step (torch.utils.flop_counter, counted once in eager fp32) / step time / the GPU's peak for that dtype;
  2. fp16 against fp32: the loss of the same 20 steps (same initial weights, same noise);
  3. sampling: one-step student against the teacher's 35-NFE Heun sampler, images/s.

    python bench/gpu_check.py                          # on a CUDA machine: the tables for BENCHMARKS.md
    python bench/gpu_check.py --device=cpu --tiny      # smoke test of this script on any machine (seconds)

Peaks (dense tensor-core TFLOP/s; fp32 rows use the TF32 peak, since cuDNN runs fp32 convolutions in TF32 by
default) are looked up from the device name; `--peak-tflops` overrides them.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time

import click
import torch

NETS = {"cifar10": ("edm-cifar10-32x32-uncond-vp", 64), "imagenet64": ("edm-imagenet-64x64-cond-adm", 32)}
# Dense peaks in TFLOP/s by device-name fragment (most specific first): NVIDIA's data sheets.
PEAK_TFLOPS = [("H100 PCIe", {"fp32": 378.0, "fp16": 756.0, "bf16": 756.0}),
               ("H100", {"fp32": 494.7, "fp16": 989.4, "bf16": 989.4}),
               ("H200", {"fp32": 494.7, "fp16": 989.4, "bf16": 989.4}),
               ("A100", {"fp32": 156.0, "fp16": 312.0, "bf16": 312.0})]
FAST = dict(attention="sdpa", channels_last=True)


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """The device's dense peak for `precision` (TFLOP/s), `override` if given, None when unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS if key in name), None)


def build_trainer(net: str, batch: int, precision: str, fast: dict, device: torch.device, tmp: str, tiny: bool,
                  residual_precision: str = "fp32"):
    """A Trainer for a PID run of network `net` (random weights, seed 0), ready for `train_step()`."""
    import edm_networks
    from pid.distances import DistanceConfig, write_random_vgg16
    from pid.methods.pid import PIDObjective
    from pid.methods.pid.student import student_from_teacher
    from pid.teachers import EDMTeacher
    from pid.training import TrainConfig
    from pid.training.distributed import DistInfo
    from pid.training.loop import Trainer
    torch.manual_seed(0)
    teacher = EDMTeacher(tiny_precond() if tiny else edm_networks.build_preset(NETS[net][0]), net)
    teacher = teacher.eval().requires_grad_(False).to(device)
    student = student_from_teacher(teacher, net)
    if tiny:
        distance = DistanceConfig("l2")
    else:
        vgg = os.path.join(tmp, "vgg16.pth")
        distance = DistanceConfig("lpips", lpips_vgg=vgg if os.path.exists(vgg) else write_random_vgg16(vgg))
    method = PIDObjective(teacher, 250, distance, residual_precision=residual_precision)
    config = TrainConfig(outdir=tmp, steps=10 ** 6, batch=batch, lr=1e-4, optimizer="radam", precision=precision,
                         device=str(device), **fast)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    return Trainer(config, method, student, dist, tmp, {}, None)


def tiny_precond():
    """A 16x16 DDPM++ EDMPrecond with attention (the glyphs16-ddpmpp preset): the smoke test's network."""
    import edm_networks
    from pid.student_presets import PRESETS
    preset = PRESETS["glyphs16-ddpmpp"]
    return edm_networks.EDMPrecond(img_resolution=16, img_channels=3, label_dim=10, model_type=preset["class"],
                                   **preset["kwargs"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_flops(trainer) -> int:
    """FLOPs of one optimizer step (matmuls, convolutions, attention), counted on the eager path."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        trainer.train_step()
    return counter.get_total_flops()


def time_steps(trainer, warmup: int, steps: int, device: torch.device) -> tuple:
    """(seconds per step, peak bytes allocated during the steps; 0 on CPU), after `warmup` untimed steps."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        trainer.train_step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return (time.perf_counter() - t0) / steps, peak


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def step_table(args, device, tmp) -> None:
    print("| network | precision | fast paths | batch | img/s | step (ms) | peak GiB | MiB/sample | TFLOP/step | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for net in args["nets"]:
        batch = args["batch"] or NETS.get(net, (None, 4))[1]
        trainer = build_trainer(net, batch, "fp32", {}, device, tmp, args["tiny"], args["residual_precision"])
        flops = step_flops(trainer)
        del trainer
        release(device)
        for precision in args["precisions"]:
            variants = [("off", {}), ("sdpa+channels_last", FAST)]
            if args["compile"] == "all" or (args["compile"] == "bf16" and precision == "bf16"):
                variants.append(("sdpa+channels_last+compile", {**FAST, "compile": True}))
            for label, fast in variants:
                trainer = build_trainer(net, batch, precision, fast, device, tmp, args["tiny"],
                                        args["residual_precision"])
                warmup = args["warmup"] + (3 if fast.get("compile") else 0)
                seconds, peak = time_steps(trainer, warmup, args["steps"], device)
                del trainer
                release(device)
                peak_tf = peak_tflops(device, precision, args["peak_tflops"])
                mfu = f"{flops / seconds / (peak_tf * 1e12):.1%}" if peak_tf else "n/a"
                mem = f"{peak / 2 ** 30:.2f} | {peak / batch / 2 ** 20:.0f}" if peak else "n/a | n/a"
                print(f"| {net} | {precision} | {label} | {batch} | {batch / seconds:.1f} | {seconds * 1e3:.1f} "
                      f"| {mem} | {flops / 1e12:.3f} | {mfu} |", flush=True)


def loss_agreement(args, device, tmp) -> None:
    """fp16 against fp32 on the same 20 steps (same initial weights and noise; fast paths off)."""
    net = args["nets"][0]
    batch = args["batch"] or NETS.get(net, (None, 4))[1]
    losses = {}
    for precision in ("fp32", "fp16"):
        trainer = build_trainer(net, batch, precision, {}, device, tmp, args["tiny"], args["residual_precision"])
        losses[precision] = [trainer.train_step()["loss"] for _ in range(args["agreement_steps"])]
        del trainer
        release(device)
    rel = [abs(b - a) / abs(a) for a, b in zip(losses["fp32"], losses["fp16"])]
    print(f"\nfp16 vs fp32 loss, {net}, batch {batch}, {len(rel)} steps: max relative difference {max(rel):.2e}, "
          f"mean {sum(rel) / len(rel):.2e}; first/last step fp32 {losses['fp32'][0]:.5g}/{losses['fp32'][-1]:.5g}, "
          f"fp16 {losses['fp16'][0]:.5g}/{losses['fp16'][-1]:.5g}")


def sampling_table(args, device) -> None:
    """One-step student against the teacher's 35-NFE Heun sampler (fp32, eager and with the fast paths)."""
    import edm_networks
    from pid.methods.pid.student import student_from_teacher
    from pid.samplers import edm_sampler
    from pid.teachers import EDMTeacher
    from pid.training.fast import prepare_networks
    from pid.training import TrainConfig
    print("\n| network | fast paths | batch | 1-step img/s | 35-NFE img/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for net in args["nets"]:
        batch = args["sample_batch"]
        torch.manual_seed(0)
        teacher = EDMTeacher(tiny_precond() if args["tiny"] else edm_networks.build_preset(NETS[net][0]), net)
        teacher = teacher.eval().requires_grad_(False).to(device)
        student = student_from_teacher(teacher, net).to(device).eval().requires_grad_(False)
        gen = torch.Generator(device=device).manual_seed(0)
        latents = torch.randn((batch, teacher.img_channels, teacher.img_resolution, teacher.img_resolution),
                              generator=gen, device=device)
        labels = torch.eye(teacher.label_dim, device=device)[torch.arange(batch, device=device) % teacher.label_dim] \
            if teacher.label_dim else None
        for label, fast in (("off", {}), ("sdpa+channels_last", FAST)):
            prepare_networks({"student": student}, _TeacherOnly(teacher), TrainConfig(**fast))
            with torch.no_grad():
                one = rate(lambda: student.generate(latents, labels), batch, 5, device)
                heun = rate(lambda: edm_sampler(teacher, latents, labels, num_steps=18), batch, 1, device)
            print(f"| {net} | {label} | {batch} | {one:.1f} | {heun:.2f} | {one / heun:.0f}x |", flush=True)
        del teacher, student
        release(device)


class _TeacherOnly:
    """The smallest 'method' prepare_networks accepts: something with a `teacher`."""

    def __init__(self, teacher):
        self.teacher = teacher


def rate(fn, batch: int, repeats: int, device: torch.device) -> float:
    """Images per second of `fn()` (one batch per call), after one warm-up call."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return batch * repeats / (time.perf_counter() - t0)


@click.command()
@click.option("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: a smoke test)")
@click.option("--tiny", is_flag=True, help="A 16x16 network, L2, batch 4, few steps: checks this script in seconds")
@click.option("--nets", default="cifar10,imagenet64", help="Comma-separated: cifar10, imagenet64")
@click.option("--precisions", default="fp32,fp16,bf16")
@click.option("--batch", type=int, default=None, help="Images per step  [default: 64 cifar10, 32 imagenet64]")
@click.option("--steps", type=int, default=5, help="Timed steps per row")
@click.option("--warmup", type=int, default=2, help="Untimed steps per row (compiled rows: 3 more)")
@click.option("--compile", type=click.Choice(["none", "bf16", "all"]), default="bf16",
              help="Rows that also get torch.compile (compiling takes about a minute per network)")
@click.option("--agreement-steps", type=int, default=20)
@click.option("--sample-batch", type=int, default=256)
@click.option("--peak-tflops", type=float, default=None, help="The device's peak for MFU  [default: from its name]")
@click.option("--residual-precision", type=click.Choice(["fp32", "amp"]), default="fp32",
              help="PID's student under fp16/bf16: in fp32 (the recipes' default) or under autocast")
def main(device, tiny, nets, precisions, batch, steps, warmup, compile, agreement_steps, sample_batch, peak_tflops,
         residual_precision):
    """Print the GPU check's tables (markdown) for BENCHMARKS.md."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("gpu_check needs a CUDA GPU and this machine has none; `python bench/gpu_check.py "
                                   "--device=cpu --tiny` checks the script itself")
    if tiny:
        nets, batch, steps, warmup, compile = "tiny16", batch or 4, 1, 1, "none"
        agreement_steps, sample_batch = min(agreement_steps, 3), min(sample_batch, 4)
    args = dict(nets=nets.split(","), precisions=precisions.split(","), batch=batch, steps=steps, warmup=warmup,
                compile=compile, agreement_steps=agreement_steps, sample_batch=sample_batch, peak_tflops=peak_tflops,
                tiny=tiny, residual_precision=residual_precision)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check on {name}, torch {torch.__version__}, PID residual precision {residual_precision}\n")
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        step_table(args, device, tmp)
        loss_agreement(args, device, tmp)
    sampling_table(args, device)
    print(f"\n{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
