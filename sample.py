"""Generate images from a teacher (EDM pickle, URL, builtin:<name>) or a distilled student checkpoint.

Follows EDM's generate.py: per-seed generators (a seed's image never depends on the batch), `{seed:06d}.png`
files, the same uint8 conversion, and seeds split across ranks under torchrun. Examples:

    python sample.py --ckpt=builtin:glyphs32 --seeds=0-63 --grid=grid.png
    python sample.py --ckpt=builtin:glyphs32 --sampler=ancestral --steps=8 --grid=grid.png
    python sample.py --ckpt=edm-cifar10-32x32-cond-vp.pkl --outdir=out --seeds=0-49999 --subdirs
    torchrun --nproc_per_node=2 sample.py --ckpt=runs/00000-pid/student-002000.pt --npz=samples.npz
"""

import os
import zipfile
from typing import Optional

import click
import numpy as np
import torch
import tqdm

from pid.cli import OneLineCommand, check_output_dir, check_output_file, user_errors
from pid.errors import CheckpointError, ConfigError
from pid.images import save_grid, save_npz, save_pngs, to_uint8
from pid.samplers import ablation_sampler, ancestral_sampler, edm_sampler
from pid.seeds import StackedRandomGenerator, parse_seeds, split_seeds
from pid.teachers import BUILTIN_PREFIX, load_teacher, teacher_names

GRID_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # PIL picks the image format from the extension


def _student_class(spec: str) -> Optional[str]:
    """The `spec['class']` of a student checkpoint ('PIDStudent', 'MMStudent'), or None for anything else.

    Student checkpoints are torch zip files; EDM pickles are not.
    """
    if spec.startswith(BUILTIN_PREFIX) or not os.path.isfile(spec) or not zipfile.is_zipfile(spec):
        return None
    from pid.training.checkpoint import read_student_checkpoint
    try:
        student_spec = read_student_checkpoint(spec)["spec"]
    except CheckpointError:
        return None
    return str(student_spec.get("class")) if isinstance(student_spec, dict) else None


def _load_student(spec: str, kind: str, device: torch.device):
    """Each method's loader, imported only when its checkpoint is met."""
    if kind == "MMStudent":
        try:
            from pid.methods.mm.student import load_mm_student
        except ImportError:
            raise CheckpointError(f"{spec} is a moment-matching student (MMStudent), but this install has no "
                                  f"pid.methods.mm; update pid to sample from it.") from None
        return load_mm_student(spec, device=device)
    if kind == "PIDStudent":
        from pid.methods.pid.student import load_student
        return load_student(spec, device=device)
    raise CheckpointError(f"{spec}: unknown student class {kind!r} (this pid knows PIDStudent and MMStudent).")


def load_generator(spec: str, device: torch.device):
    """(module, is_student): a student (`generate(latents, labels, ...)`) or a teacher denoiser (`D(x, σ, labels)`).

    Student checkpoints name their class in `spec['class']`: PID's one-step students and moment matching's
    k-step ones (`stochastic = True`, sampled with per-seed noise) load through their method's loader.
    """
    kind = _student_class(spec)
    if kind is not None:
        return _load_student(spec, kind, device), True
    if not spec.startswith(BUILTIN_PREFIX) and not os.path.isfile(spec) and "://" not in spec:
        raise CheckpointError(f"--ckpt {spec}: no such file. Give an EDM network pickle, a student checkpoint "
                              f"(.pt), an http(s) URL, or {teacher_names()}.")
    return load_teacher(spec, device=device), False


def draw_labels(rnd: StackedRandomGenerator, label_dim: int, n: int, class_idx: Optional[int], device):
    """EDM's labels: one-hot of a per-seed randint (drawn after the latents), overwritten by --class."""
    if not label_dim:
        return None
    labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[n], device=device)]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


_ABLATION_KEYS = ("solver", "discretization", "schedule", "scaling")
_ANCESTRAL_KEYS = ("num_steps", "sigma_min", "sigma_max", "rho")


def _sample_teacher(model, latents, labels, rnd: StackedRandomGenerator, sampler: str, sampler_kwargs: dict):
    """float64 images from a teacher denoiser: EDM's Heun (or ablation) sampler, or MM's ancestral sampler."""
    if sampler == "ancestral":
        kwargs = {k: v for k, v in sampler_kwargs.items() if k in _ANCESTRAL_KEYS}
        return ancestral_sampler(model, latents, labels, randn_like=rnd.randn_like, **kwargs)
    ablation = any(k in sampler_kwargs for k in _ABLATION_KEYS)
    return (ablation_sampler if ablation else edm_sampler)(model, latents, labels, randn_like=rnd.randn_like,
                                                            **sampler_kwargs)


@torch.no_grad()
def generate_batch(model, is_student: bool, seeds, class_idx: Optional[int], sampler_kwargs: dict, device,
                   sampler: str = "heun"):
    """Images for one batch of seeds: (uint8 [N,H,W,C], class indices [N] or None).

    Teachers: `sampler` 'heun' (EDM's sampler; its ablation sampler when solver/discretization/schedule/scaling
    are given) or 'ancestral' (moment matching's Algorithm 1); `num_steps` absent means 18 and 4 steps.
    Students: one `generate` call per batch; a stochastic one (`stochastic = True`) also gets the seeds' own
    `randn_like` and `num_steps` (None: its own k). Every draw comes from the seed's generator, so a seed's
    image never depends on its batch.
    """
    rnd = StackedRandomGenerator(device, seeds)
    shape = [len(seeds), model.img_channels, model.img_resolution, model.img_resolution]
    latents = rnd.randn(shape, device=device)
    labels = draw_labels(rnd, model.label_dim, len(seeds), class_idx, device)
    if is_student and getattr(model, "stochastic", False) is True:
        images = model.generate(latents, labels, randn_like=rnd.randn_like,
                                num_steps=sampler_kwargs.get("num_steps")).clamp(-1, 1)
    elif is_student:  # one network call per batch
        images = model.generate(latents, labels).clamp(-1, 1)
    else:
        images = _sample_teacher(model, latents, labels, rnd, sampler, sampler_kwargs)
    return to_uint8(images), None if labels is None else labels.argmax(dim=1).cpu()


def _check_sampler(sampler: str, sampler_kwargs: dict) -> None:
    """The ancestral sampler has no churn and no ablation axes: refuse options it would silently ignore."""
    if sampler != "ancestral":
        return
    given = [f"--{'disc' if k == 'discretization' else k}" for k in _ABLATION_KEYS if k in sampler_kwargs]
    if sampler_kwargs.get("S_churn", 0) != 0:
        given.append("--S_churn")
    if given:
        raise ConfigError(f"--sampler=ancestral takes only --steps, --sigma_min, --sigma_max and --rho; drop "
                          f"{', '.join(given)} (they belong to --sampler=heun).")


def _check_class(class_idx: Optional[int], label_dim: int) -> None:
    if class_idx is None:
        return
    if not label_dim:
        raise ConfigError(f"--class={class_idx} given, but this model is unconditional (label_dim 0); drop --class.")
    if class_idx >= label_dim:
        raise ConfigError(f"--class={class_idx} is out of range: this model has {label_dim} classes "
                          f"(0..{label_dim - 1}).")


def _init_distributed(device_opt: Optional[str]):
    """(rank, world, device): torchrun's environment when present, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available() and (device_opt is None or device_opt.startswith("cuda"))
    if device_opt is None or (world > 1 and cuda):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}" if cuda else "cpu")
    else:
        device = torch.device(device_opt)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _gather(local: dict, world: int) -> dict:
    """Merge every rank's {batch index: (uint8, labels)} (only rank 0 uses the result)."""
    if world == 1:
        return local
    parts = [None] * world
    torch.distributed.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def _collect_sampler_kwargs(steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise,
                            solver, disc, schedule, scaling) -> dict:
    kwargs = dict(num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, S_churn=S_churn,
                  S_min=S_min, S_max=S_max, S_noise=S_noise, solver=solver, discretization=disc,
                  schedule=schedule, scaling=scaling)
    return {k: v for k, v in kwargs.items() if v is not None}  # unset options keep the sampler's default


@click.command(cls=OneLineCommand, context_settings=dict(help_option_names=["-h", "--help"]))
@click.option("--ckpt", required=True,
              help="EDM network pickle, http(s) URL, student checkpoint (.pt) or builtin:<name>")
@click.option("--outdir", type=str, default=None, help="Where to write {seed:06d}.png files")
@click.option("--seeds", type=str, default="0-63", show_default=True, help="Seed list, e.g. 0-63 or 1,2,5-9")
@click.option("--subdirs", is_flag=True, help="Write PNGs into a subfolder per 1000 seeds")
@click.option("--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class label [default: random]")
@click.option("--batch", "max_batch_size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Maximum batch size per process")
@click.option("--sampler", type=click.Choice(["heun", "ancestral"]), default="heun", show_default=True,
              help="Teacher sampler: EDM's Heun, or moment matching's ancestral (Alg. 1)")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Sampler steps: heun 18, ancestral k=4, MM student its own k [default]")
@click.option("--sigma_min", type=click.FloatRange(min=0, min_open=True), default=None, help="Lowest noise level")
@click.option("--sigma_max", type=click.FloatRange(min=0, min_open=True), default=None, help="Highest noise level")
@click.option("--rho", type=click.FloatRange(min=0, min_open=True), default=7, show_default=True,
              help="Time step exponent")
@click.option("--S_churn", "S_churn", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Stochasticity strength")
@click.option("--S_min", "S_min", type=click.FloatRange(min=0), default=0, show_default=True,
              help="Stochastic lowest σ")
@click.option("--S_max", "S_max", type=click.FloatRange(min=0), default=float("inf"), show_default=True,
              help="Stochastic highest σ")
@click.option("--S_noise", "S_noise", type=float, default=1, show_default=True, help="Stochastic noise inflation")
@click.option("--solver", type=click.Choice(["euler", "heun"]), default=None, help="Ablation sampler: ODE solver")
@click.option("--disc", type=click.Choice(["vp", "ve", "iddpm", "edm"]), default=None,
              help="Ablation sampler: σ steps")
@click.option("--schedule", type=click.Choice(["vp", "ve", "linear"]), default=None, help="Ablation sampler: σ(t)")
@click.option("--scaling", type=click.Choice(["vp", "none"]), default=None, help="Ablation sampler: s(t)")
@click.option("--grid", type=str, default=None, help="Also write all images as one PNG grid here")
@click.option("--npz", type=str, default=None, help="Also write images (uint8 NHWC), labels and seeds here")
@click.option("--device", type=str, default=None, help="torch device [default: cuda when available, else cpu]")
@click.option("--attention", type=click.Choice(["edm", "sdpa"]), default="edm", show_default=True,
              help="EDM networks' attention: EDM's float32 op or scaled_dot_product_attention (faster on GPUs)")
@click.option("--compile", "compile_net", is_flag=True, help="torch.compile the network (pays off for many batches)")
@user_errors
def main(ckpt, outdir, seeds, subdirs, class_idx, max_batch_size, device, grid, npz, sampler, attention, compile_net,
         **sampler_opts):
    """Generate images with EDM's or moment matching's sampler (teachers), or the student's own generator."""
    seed_list = parse_seeds(seeds)
    if not (outdir or grid or npz):
        raise ConfigError("Nothing to write: give --outdir, --grid and/or --npz.")
    _check_outputs(outdir, grid, npz)
    sampler_kwargs = _collect_sampler_kwargs(**sampler_opts)
    _check_sampler(sampler, sampler_kwargs)
    rank, world, dev = _init_distributed(device)
    if rank == 0:  # rank 0 first, so that only one process downloads
        model, is_student = load_generator(ckpt, dev)
    _barrier(world)
    if rank != 0:
        model, is_student = load_generator(ckpt, dev)
    _check_class(class_idx, model.label_dim)
    if attention != "edm":
        from edm_networks import set_attention
        set_attention(model, attention)
    if compile_net:
        model.compile()
    mine = split_seeds(seed_list, max_batch_size, rank, world)
    local = {}
    for index, batch_seeds in tqdm.tqdm(mine, unit="batch", disable=rank != 0, desc="sample"):
        images, labels = generate_batch(model, is_student, batch_seeds, class_idx, sampler_kwargs, dev, sampler)
        if outdir:
            save_pngs(images, batch_seeds, outdir, subdirs)
        if grid or npz:
            local[index] = (batch_seeds, images.numpy(), None if labels is None else labels.numpy())
    _write_collections(_gather(local, world) if (grid or npz) else {}, rank, grid, npz)
    _barrier(world)
    if world > 1:
        torch.distributed.destroy_process_group()


def _check_outputs(outdir: Optional[str], grid: Optional[str], npz: Optional[str]) -> None:
    """Every output must be writable before the first image is sampled, not after the last one."""
    if outdir:
        check_output_dir(outdir, "--outdir")
    if grid:
        check_output_file(grid, "--grid", GRID_EXTENSIONS)
    if npz:
        check_output_file(npz, "--npz", (".npz",))  # np.savez would silently append .npz to any other name


def _write_collections(results: dict, rank: int, grid: Optional[str], npz: Optional[str]) -> None:
    """Rank 0 writes the grid and npz from all batches, in seed-list order."""
    if rank != 0 or not results:
        return
    ordered = [results[k] for k in sorted(results)]
    seeds = [s for part in ordered for s in part[0]]
    images = np.concatenate([part[1] for part in ordered])
    labels = None if ordered[0][2] is None else np.concatenate([part[2] for part in ordered])
    if grid:
        save_grid(images, grid)
    if npz:
        save_npz(npz, images, labels, seeds)


if __name__ == "__main__":
    main()  # pylint: disable=no-value-for-parameter
