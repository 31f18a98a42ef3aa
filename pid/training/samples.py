"""The fixed-seed sample grid written during training (samples-<step>.png)."""

from typing import Optional, Tuple

import torch

__all__ = ["grid_inputs", "write_sample_grid"]


def grid_inputs(student: torch.nn.Module, num: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Unit-normal latents [num,C,H,W] from one generator per seed 0..num-1, and one-hot labels
    [num,label_dim] (class = seed mod label_dim) or None; fixed for the whole run."""
    shape = (student.img_channels, student.img_resolution, student.img_resolution)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in range(num)])
    labels = None
    if getattr(student, "label_dim", 0):
        labels = torch.eye(student.label_dim)[torch.arange(num) % student.label_dim]
    return latents, labels


@torch.no_grad()
def write_sample_grid(student: torch.nn.Module, path: str, num: int, chunk: int, device: torch.device) -> None:
    """Generate the grid's images with `student.generate` (images in [-1, 1]) and save them as one PNG."""
    from pid.images import save_grid, to_uint8  # PIL only when a grid is written

    latents, labels = grid_inputs(student, num)
    # Stochastic samplers (moment matching) draw their step noise from a fixed generator too: the grids of a
    # run compare like with like, and the trainer's global RNG is left alone.
    noise = torch.Generator().manual_seed(num)
    extra = {}
    if getattr(student, "stochastic", False):
        extra["randn_like"] = lambda x: torch.randn(x.shape, generator=noise, dtype=x.dtype).to(x.device)
    images = []
    for i in range(0, num, chunk):
        lab = None if labels is None else labels[i:i + chunk].to(device)
        images.append(student.generate(latents[i:i + chunk].to(device), lab, **extra).float().clamp(-1, 1).cpu())
    save_grid(to_uint8(torch.cat(images)).numpy(), path)
