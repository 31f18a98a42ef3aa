"""Cost of one moment-matching training step, Algorithm 2 (alternating) vs Algorithm 3 (parameter space).

Full-size EDM teachers with random weights (the cost does not depend on the values): CIFAR-10 DDPM++
(edm-cifar10-32x32-cond-vp, 56M parameters) and ImageNet-64 ADM (edm-imagenet-64x64-cond-adm, 296M), at a small
batch. A step is what the trainer does: the method's loss, backward of Σ loss / batch, an Adam step on the phase's
network. Algorithm 2 alternates an auxiliary and a generator step (both timed, and their mean); Algorithm 3's
step is always a generator step (with the Adam preconditioner, after its first step: the timed steps run the
parameter JVP). Peak memory is the process's peak RSS (each configuration in a fresh process): in total, and
above what the networks, method and optimizers hold before the first step, per sample.

    python bench/mm_step_cost.py                        # both networks, both algorithms, batch 2, 2 timed steps
    python bench/mm_step_cost.py --nets=cifar10 --batch=4 --algorithms=parameter
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pid_step_cost import _peak_bytes, measure_in_subprocess  # noqa: E402  (CUDA: max allocated; CPU: peak RSS)

NETS = {"cifar10": "edm-cifar10-32x32-cond-vp", "imagenet64": "edm-imagenet-64x64-cond-adm"}


class RandomImages:
    """Images in [-1, 1] and one-hot labels from the passed generator (the `pid.data` interface)."""

    def __init__(self, shape, label_dim):
        self.shape, self.label_dim = shape, label_dim

    def sample(self, position, n, gen, device):
        x = torch.rand(n, *self.shape, generator=gen) * 2 - 1
        y = torch.eye(self.label_dim)[torch.randint(self.label_dim, (n,), generator=gen)]
        return x.to(device), y.to(device)


def _build(net: str, algorithm: str, device: torch.device):
    import edm_networks
    from pid.methods.mm import MomentMatching, ParameterMomentMatching, denoiser_from_teacher
    from pid.teachers import EDMTeacher
    torch.manual_seed(0)
    teacher = EDMTeacher(edm_networks.build_preset(NETS[net]).eval().requires_grad_(False), NETS[net]).to(device)
    data = RandomImages((teacher.img_channels, teacher.img_resolution, teacher.img_resolution), teacher.label_dim)
    lo, hi = max(teacher.sigma_min, 0.002), min(teacher.sigma_max, 80.0)
    nets = {"generator": denoiser_from_teacher(teacher, NETS[net])[0].to(device)}
    if algorithm == "alternating":
        method = MomentMatching(teacher, data, 4, lo, hi)
        nets["aux"] = denoiser_from_teacher(teacher, NETS[net])[0].to(device)
    else:
        method = ParameterMomentMatching(teacher, data, 4, lo, hi, preconditioner="adam").to(device)
    optims = {k: torch.optim.Adam(v.parameters(), lr=1e-6, betas=(0.0, 0.99), eps=1e-12) for k, v in nets.items()}
    return method, nets, optims


def measure(net: str, algorithm: str, batch: int, repeats: int, device: torch.device) -> dict:
    """Seconds per step (mean of `repeats` timed steps after one warm-up step per phase) and peak memory."""
    from pid.training.loop import MicroBatch
    method, nets, optims = _build(net, algorithm, device)
    for name, opt in optims.items():   # materialise Adam's moments before the baseline: they are standing memory
        for p in nets[name].parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=False)
    base = _peak_bytes(device)
    gen = torch.Generator(device=device)
    phases, warm = {}, 2 if algorithm == "alternating" else 1
    for step in range(warm * (repeats + 1)):
        phase = method.phase(step)
        gen.manual_seed(step)
        t0 = time.perf_counter()
        losses, _ = method.loss(nets, batch, gen, device, MicroBatch(step, phase, 0, step * batch))
        (losses.sum() / batch).backward()
        optims[phase].step()
        optims[phase].zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warm:   # the first step of each phase is a warm-up (and Algorithm 3's has no preconditioner yet)
            phases.setdefault(phase, []).append(time.perf_counter() - t0)
    peak = _peak_bytes(device)
    per_phase = {k: sum(v) / len(v) for k, v in phases.items()}
    trainable = sum(p.numel() for n in nets.values() for p in n.parameters())
    return {"net": net, "algorithm": algorithm, "batch": batch, "phases": per_phase,
            "step": sum(per_phase.values()) / len(per_phase), "trainable": trainable,
            "peak_gib": peak / 2 ** 30, "above_mib_per_sample": (peak - base) / batch / 2 ** 20,
            "device": str(device), "threads": torch.get_num_threads()}


@click.command()
@click.option("--nets", default="cifar10,imagenet64", help="Comma-separated: cifar10, imagenet64")
@click.option("--algorithms", default="alternating,parameter", help="Comma-separated: alternating, parameter")
@click.option("--batch", type=int, default=2, help="Images per step (even: Algorithm 3 splits it into halves)")
@click.option("--repeats", type=int, default=2, help="Timed steps per phase after one warm-up each")
@click.option("--device", default="cpu")
@click.option("--one", is_flag=True, hidden=True, help="Measure one net and algorithm in this process")
def main(nets, algorithms, batch, repeats, device, one):
    """Print a markdown table of moment-matching step costs."""
    if one:
        print(json.dumps(measure(nets, algorithms, batch, repeats, torch.device(device))))
        return
    rows = [measure_in_subprocess(__file__, [f"--nets={net}", f"--algorithms={alg}", f"--batch={batch}",
                                             f"--repeats={repeats}", f"--device={device}"])
            for net in nets.split(",") for alg in algorithms.split(",")]
    print("| network | algorithm | trainable params | batch | aux step (s) | generator step (s) | mean step (s) "
          "| peak RSS (GiB) | peak above standing state, per sample (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        aux = r["phases"].get("aux")
        print(f"| {NETS[r['net']]} | {r['algorithm']} | {r['trainable'] / 1e6:.1f}M | {r['batch']} "
              f"| {'—' if aux is None else f'{aux:.2f}'} | {r['phases']['generator']:.2f} | {r['step']:.2f} "
              f"| {r['peak_gib']:.2f} | {r['above_mib_per_sample']:.0f} |")
    print(f"\ndevice {rows[0]['device']}, {rows[0]['threads']} torch threads, {repeats} timed steps per phase "
          f"after 1 warm-up")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
