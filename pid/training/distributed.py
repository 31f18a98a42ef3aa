"""Process-group setup for torchrun, gradient synchronisation, and the few collectives the trainer uses.

Gradients are synchronised by `DistributedDataParallel` (`--grad-sync=ddp`, the default): each trainable network
is wrapped, the all-reduce of a bucket starts as soon as its gradients are ready in the last accumulation round
(overlapping the rest of that backward pass), and earlier rounds run under `no_sync()`. Details that keep
"N processes = 1 process with accumulation" and the method interface intact:
- the buckets are *summed*, not averaged (a comm hook), because the loss is already divided by the global batch;
- `find_unused_parameters=True`: a copied EDM network has parameters a PID/MM call never uses (`map_augment`
  without augment labels). Its cost, one walk of the autograd graph per step, is paid only in the synchronising
  round. `static_graph=True` would avoid the walk, but torch 2.14.1 fails an internal assert (`expect_autograd_hooks_`)
  when it meets `no_sync()` (measured with gloo, 2 processes);
- the wrapper forwards attribute reads to the network (`student.img_channels`, `generate`), so methods use it as
  the bare module. Gradients flow through DDP only for calls of `forward`: a method must call a trainable network
  through `__call__` (PID: one call on the 2B batch; MM: one call of the phase's network with gradient);
- `broadcast_buffers=False`: buffers are identical from the start and the trainer never lets them diverge.
`--grad-sync=manual` keeps the hand-written path (sum every gradient after all rounds in 64 MB buckets, no
overlap), for methods that compute gradients outside `forward`.
"""

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Sequence

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DistInfo", "init_distributed", "local_device", "all_reduce_sum_", "all_reduce_grads_",
           "broadcast_params_", "broadcast_object", "gather_objects", "barrier", "wrap_ddp"]

_BUCKET_ELEMENTS = 1 << 24   # 16M floats (64 MB) per all-reduce: few calls, bounded extra memory
_TIMEOUT = datetime.timedelta(hours=1)  # rank 0 may evaluate FID while the others wait


@dataclass
class DistInfo:
    """Where this process sits: rank within world_size processes, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False   # True when init_distributed created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shutdown(self) -> None:
        """Destroy the process group if we created it."""
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
            self.owns_group = False


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def local_device(device: str | None = None) -> torch.device:
    """The device this process computes on (`device`, else cuda:LOCAL_RANK when CUDA exists, else cpu); joins
    nothing."""
    return _pick_device(device, int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))))


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group named by RANK/WORLD_SIZE/LOCAL_RANK (NCCL on CUDA, gloo on CPU).

    Without those variables (or with WORLD_SIZE=1) this is a single process. A group that already exists
    (created by the caller) is used as is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if tdist.is_available() and tdist.is_initialized():
        world, rank = tdist.get_world_size(), tdist.get_rank()
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        tdist.init_process_group(backend=backend, timeout=_TIMEOUT, **kwargs)
        owns = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, owns_group=owns)


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (no-op in a single process)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def _buckets(tensors: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
    buckets, current, size = [], [], 0
    for t in tensors:
        if current and (size + t.numel() > _BUCKET_ELEMENTS or t.dtype != current[0].dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(t)
        size += t.numel()
    if current:
        buckets.append(current)
    return buckets


def all_reduce_grads_(params: Sequence[torch.nn.Parameter]) -> None:
    """Sum every parameter's .grad over processes, in flat buckets (grads must all exist)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return
    for bucket in _buckets([p.grad for p in params]):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def broadcast_params_(module: torch.nn.Module) -> None:
    """Make every process start from rank 0's parameters and buffers."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        for t in list(module.parameters()) + list(module.buffers()):
            tdist.broadcast(t.data, src=0)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every process (pickled; small objects only)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> List[Any]:
    """Every process's `obj`, in rank order, on every process (small objects only)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


class _DDP(DistributedDataParallel):
    """DDP whose wrapper also answers for the network's own attributes (img_channels, label_dim, generate...)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None or name == "module":   # during DDP's own __init__: no forwarding, no recursion
                raise
            return getattr(inner, name)


def _sum_hook(state: Any, bucket: tdist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    # DDP's default hook divides by the world size; our loss is already the mean over the global batch.
    work = tdist.all_reduce(bucket.buffer(), op=tdist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(module: torch.nn.Module, dist: DistInfo) -> torch.nn.Module:
    """`module` wrapped for overlapped, summed gradient all-reduce (see the module docstring); `module` itself in
    a single process. Gradients become views into DDP's buckets (no second copy of them in memory)."""
    if not dist.distributed:
        return module
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    ddp = _DDP(module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True,
               gradient_as_bucket_view=True)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()
