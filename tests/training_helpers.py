"""A toy student and a toy method that follow the trainer's interface, for tests of pid.training.

Run as a script it trains one toy run (used by the SIGKILL/resume test, which needs a separate process):
    python tests/training_helpers.py OUTDIR STEPS [--hang-at-call K --marker FILE]
"""

import os
import sys
import time
from typing import Dict, Optional, Tuple

import torch

from pid.training import TrainConfig, train


class ToyStudent(torch.nn.Module):
    """Two 3x3 convolutions on 1x4x4 images; `generate` maps unit-normal latents to [-1, 1]."""

    img_resolution, img_channels, label_dim = 4, 1, 0
    sigma_min, sigma_max = 0.002, 80.0

    def __init__(self, seed: int = 0, width: int = 4):
        super().__init__()
        torch.manual_seed(seed)
        self.width = width
        self.net = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(width, 1, 3, padding=1))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))  # buffers are copied by EMAs,
        self.register_buffer("running", torch.zeros(2))                     # float ones included

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    def generate(self, latents: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.tanh(self.net(latents))

    def export_spec(self) -> dict:
        return {"class": "ToyStudent", "width": self.width}


class ToyMethod:
    """Regress the student's output on noise towards a fixed function of the noise (per-sample MSE).

    nan_at_call: make the loss NaN in that call (0-based count of this object's loss calls).
    hang_at_call: write `marker` and sleep forever in that call (to be killed from outside).
    """

    name = "toy"

    def __init__(self, nan_at_call: Optional[int] = None, hang_at_call: Optional[int] = None,
                 marker: Optional[str] = None):
        self.calls = 0
        self.nan_at_call, self.hang_at_call, self.marker = nan_at_call, hang_at_call, marker
        self.output_dtypes = set()
        self.student_types = set()   # what the trainer passes: the network or its DDP wrapper

    def loss(self, student, batch_size: int, generator: torch.Generator,
             device: torch.device) -> Tuple[torch.Tensor, Dict[str, float]]:
        if self.calls == self.hang_at_call:
            open(self.marker, "w").close()
            while True:
                time.sleep(1)
        z = torch.randn([batch_size, 1, 4, 4], generator=generator, device=device)
        out = student(z)
        self.output_dtypes.add(out.dtype)
        self.student_types.add(type(student).__name__)
        target = 0.5 * torch.sin(3 * z) + 0.1
        losses = (out.float() - target).square().mean(dim=(1, 2, 3))
        if self.calls == self.nan_at_call:
            losses = losses * float("nan")
        self.calls += 1
        return losses, {"out_mean": float(out.detach().float().mean())}

    def config_dict(self) -> dict:
        return {"target": "0.5 sin(3z) + 0.1"}


def toy_config(outdir: str, **overrides) -> TrainConfig:
    """A tiny fast configuration: Adam 1e-2, batch 8, two EMAs, no grids."""
    base = dict(outdir=outdir, steps=4, batch=8, lr=1e-2, optimizer="adam", ema=(0.5, 0.9), default_ema=0.9,
                snap=2, grid_every=0, log_every=1, device="cpu", desc="toy")
    base.update(overrides)
    return TrainConfig(**base)


def ddp_worker(rank: int, world: int, port: int, outdir: str, overrides: dict,
               types_file: Optional[str] = None) -> None:
    """torch.multiprocessing.spawn target: one rank of a gloo (CPU) run, with torchrun's environment.
    `types_file`: write the class names of the student objects the method was given there (rank 0)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    method = ToyMethod()
    train(toy_config(outdir, **overrides), method, ToyStudent())
    if types_file and rank == 0:
        with open(types_file, "w") as f:
            f.write(",".join(sorted(method.student_types)))


def ddp_worker_reporting(rank: int, world: int, port: int, outdir: str, overrides: dict, report: str) -> None:
    """Like ddp_worker, but writes '<ExceptionType>: message' (or 'ok') to `report-<rank>.txt`."""
    try:
        ddp_worker(rank, world, port, outdir, overrides)
        outcome = "ok"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    with open(f"{report}-{rank}.txt", "w") as f:
        f.write(outcome)


def run_toy(outdir: str, steps: int, hang_at_call: Optional[int] = None, marker: Optional[str] = None) -> str:
    """One toy run with resume='auto' (the SIGKILL test runs this in a child process and kills it)."""
    torch.set_num_threads(1)
    return train(toy_config(outdir, steps=steps, resume="auto"),
                 ToyMethod(hang_at_call=hang_at_call, marker=marker), ToyStudent())


def main(argv) -> None:
    hang = int(argv[argv.index("--hang-at-call") + 1]) if "--hang-at-call" in argv else None
    marker = argv[argv.index("--marker") + 1] if "--marker" in argv else None
    run_toy(argv[0], int(argv[1]), hang, marker)


if __name__ == "__main__":
    main(sys.argv[1:])
