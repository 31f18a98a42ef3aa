"""The generic trainer's configuration: one dataclass, validated before anything runs.

Method-specific settings (the PID grid, the distance, the teacher) live in the method's own dataclass and
reach the run through `train(..., extra_config=...)`; this file knows nothing about them.
"""

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional, Tuple

from pid.errors import ConfigError

__all__ = ["TrainConfig", "ema_name", "trajectory_fields", "OPTIMIZERS", "PRECISIONS", "LR_SCHEDULES", "SNAP_EMAS",
           "ATTENTIONS", "GRAD_SYNCS"]

OPTIMIZERS = ("radam", "adam")
PRECISIONS = ("fp32", "fp16", "bf16")
LR_SCHEDULES = ("constant", "linear")
SNAP_EMAS = ("default", "all")
ATTENTIONS = ("edm", "sdpa")
GRAD_SYNCS = ("ddp", "manual")

# Fields that may change between a run and its resumption without changing the trajectory of the weights.
# `steps` is also free when the learning rate does not depend on it (constant schedule): that is how a run
# is extended.
RESUME_FREE_FIELDS = ("outdir", "resume", "snap", "grid_every", "grid_seeds", "log_every", "eval_every",
                      "keep_states", "keep_students", "snap_emas", "device", "desc", "attention", "channels_last",
                      "compile", "grad_sync", "plot", "tensorboard")
# attention ... grad_sync are speed options: they change results only by floating-point rounding, like `device`;
# plot and tensorboard only write files beside the logs.


def ema_name(beta: float) -> str:
    """The key of an EMA in checkpoints: its decay rate written shortest, e.g. 0.9999 -> '0.9999'."""
    return f"{float(beta):g}"


@dataclass
class TrainConfig:
    """Everything the generic training loop needs. Units: steps are optimizer steps; batches are images."""

    outdir: str = "runs"                 # parent folder; each run gets outdir/NNNNN-<desc>/
    steps: int = 1000                    # total optimizer steps (the run stops after this many)
    batch: int = 512                     # global batch, all processes and accumulation rounds together
    batch_gpu: Optional[int] = None      # images per forward/backward per process; None = batch / world size
    lr: float = 2e-4                     # peak learning rate
    optimizer: str = "radam"             # 'radam' (the reference) or 'adam'
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0                      # steps of linear warm-up from 0 to lr (the reference uses none)
    lr_schedule: str = "constant"        # 'constant' or 'linear' (linear decay to 0 at `steps`)
    grad_clip: Optional[float] = None    # max global gradient norm; None = no clipping (the reference)
    precision: str = "fp32"              # 'fp32', 'fp16' (autocast + GradScaler) or 'bf16' (autocast)
    ema: Tuple[float, ...] = (0.999, 0.9999, 0.99995)
    default_ema: Optional[float] = 0.9999  # EMA used by samples/evaluation/student checkpoints; None = raw
    seed: int = 0
    snap: int = 1000                     # steps between student-<step>.pt / training-state-<step>.pt
    keep_states: int = 2                 # keep the newest K training states (0 = keep all)
    keep_students: int = 0               # keep the newest K student-<step>.pt (0 = keep all; student-best.pt stays)
    snap_emas: str = "default"           # weights in student checkpoints: 'default' (the default EMA) or 'all'
    grid_every: int = 1000               # steps between samples-<step>.png (0 = never)
    grid_seeds: int = 64                 # the grid shows seeds 0..grid_seeds-1
    log_every: int = 10                  # steps between lines of log.txt / stats.jsonl
    eval_every: int = 0                  # steps between evaluations (0 = never; needs an evaluator)
    resume: Optional[str] = None         # None, 'auto', a run directory or a training-state file
    device: Optional[str] = None         # None = cuda:LOCAL_RANK when available, else cpu
    desc: str = "train"                  # run directory suffix
    # Speed options (GPU fast paths; each changes results only by floating-point rounding, docs/training.md):
    attention: str = "edm"               # 'edm' (EDM's float32 AttentionOp) or 'sdpa' (scaled_dot_product_attention)
    channels_last: bool = False          # networks (trainable and teacher) in channels_last memory format
    compile: bool = False                # torch.compile the trainable networks and the teacher
    grad_sync: str = "ddp"               # several processes: 'ddp' (DistributedDataParallel, overlapped) or 'manual'
    # Tracking (main process; neither changes results, tracking.py):
    plot: bool = True                    # write run_dir/report.png after each evaluation and snapshot
    tensorboard: bool = False            # also write scalars and grids to run_dir/tensorboard/ (needs tensorboard)

    def to_dict(self) -> dict:
        """JSON-able dict of every field (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def ema_names(self) -> Tuple[str, ...]:
        """Checkpoint keys of the configured EMAs, in order."""
        return tuple(ema_name(b) for b in self.ema)

    def default_ema_name(self) -> str:
        """Checkpoint key of the default weights: an EMA name, or 'raw'."""
        return "raw" if self.default_ema is None else ema_name(self.default_ema)

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError naming the first inconsistent option and how to fix it."""
        _check(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        _check(self.batch >= 1, f"--batch must be >= 1, got {self.batch}")
        _check(self.batch % world_size == 0,
               f"--batch={self.batch} is not divisible by the number of processes ({world_size}); "
               f"use a multiple of {world_size}")
        per_rank = self.batch // world_size
        if self.batch_gpu is not None:
            _check(self.batch_gpu >= 1 and per_rank % self.batch_gpu == 0,
                   f"--batch-gpu={self.batch_gpu} does not divide the per-process batch {per_rank} "
                   f"(= --batch {self.batch} / {world_size} processes); pick a divisor of {per_rank}")
        _check(self.optimizer in OPTIMIZERS, f"unknown --optimizer={self.optimizer!r}; choose one of {OPTIMIZERS}")
        _check(self.precision in PRECISIONS, f"unknown --precision={self.precision!r}; choose one of {PRECISIONS}")
        _check(self.snap_emas in SNAP_EMAS, f"unknown --snap-emas={self.snap_emas!r}; choose one of {SNAP_EMAS}")
        _check(self.lr_schedule in LR_SCHEDULES,
               f"unknown --lr-schedule={self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        _check(self.attention in ATTENTIONS, f"unknown --attention={self.attention!r}; choose one of {ATTENTIONS}")
        _check(self.grad_sync in GRAD_SYNCS, f"unknown --grad-sync={self.grad_sync!r}; choose one of {GRAD_SYNCS}")
        _check(0 < self.lr < float("inf"), f"--lr must be a finite number > 0, got {self.lr}")
        _check(0 <= self.seed < 2 ** 63, f"--seed must be in [0, 2^63), got {self.seed}")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               f"--betas must be two numbers in [0, 1), got {self.betas}")
        _check(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        _check(self.grad_clip is None or self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}")
        _check(all(0 < b < 1 for b in self.ema), f"--ema rates must lie in (0, 1), got {self.ema}")
        _check(len(set(self.ema_names())) == len(self.ema), f"--ema has duplicate rates: {self.ema}")
        _check(self.default_ema is None or ema_name(self.default_ema) in self.ema_names(),
               f"--default-ema={self.default_ema} is not one of --ema={self.ema}; add it or pick one of them")
        for name in ("snap", "grid_every", "log_every", "eval_every", "keep_states", "keep_students", "grid_seeds"):
            _check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")

    def batch_per_rank(self, world_size: int) -> int:
        """Images per process per optimizer step."""
        return self.batch // world_size

    def micro_batch(self, world_size: int) -> int:
        """Images per forward/backward (batch_gpu, or the whole per-process batch)."""
        return self.batch_gpu or self.batch_per_rank(world_size)

    def accum_rounds(self, world_size: int) -> int:
        """Forward/backward rounds per process per optimizer step (gradient accumulation)."""
        return self.batch_per_rank(world_size) // self.micro_batch(world_size)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def trajectory_fields(config_dict: dict) -> dict:
    """The part of a saved TrainConfig that must match for a resume to continue the same trajectory."""
    free = set(RESUME_FREE_FIELDS)
    if config_dict.get("lr_schedule") == "constant":
        free.add("steps")
    return {k: v for k, v in config_dict.items() if k not in free}

