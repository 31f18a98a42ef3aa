"""Which σ ranges drive the moment-matching generator update, under each weighting w(σ_s)?

Loads a training state of a `train_mm.py` run (generator and auxiliary denoiser as trained), draws one large batch
of Algorithm 2's generator step (data, s, t, z_t, z_s exactly as in training, from a fixed seed), splits it by the
target noise level σ_s into bins, and for each weighting reports each bin's share of the samples and its share of
the gradient: ‖g_bin‖ / Σ_bins ‖g_bin‖, where g_bin is the generator gradient of the surrogate summed over the bin's
samples. A share far above the sample share means a few noise levels steer the update.

    python bench/mm_weight_share.py --state=bench-runs/.../training-state-0002000.pt --num=1024
"""

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pid.cli import user_errors  # noqa: E402
from pid.methods.mm import loss_weight  # noqa: E402

EDGES = (0.002, 0.01, 0.05, 0.2, 1.0, 5.0, 80.0001)


def _build(state_path: str):
    from pid.methods.mm import build_mm_run
    from pid.methods.mm.recipes import mm_config_from
    from pid.training.checkpoint import read_training_state
    state = read_training_state(state_path)
    opts = {**state["config"]["extra"]["mm"]}
    method, nets, _ = build_mm_run(mm_config_from(opts), seed=state["config"]["train"]["seed"])
    for name, net in nets.items():
        net.load_state_dict(state["networks"][name])
    return method, nets, state["step"]


def _bin_gradients(method, nets, num: int, seed: int):
    """Per-bin generator gradients (flattened) of the unweighted surrogate times each weighting."""
    gen = torch.Generator().manual_seed(seed)
    x, labels = method.data.sample(0, num, gen, torch.device("cpu"))
    x_tilde, z_s, sigma_s = method.sample_z_s(nets["generator"], x, labels, gen, grad=True)
    with torch.no_grad():
        gap = (nets["aux"](z_s, sigma_s, labels) - method.teacher(z_s, sigma_s, labels)).float()
    per_sample = (x_tilde * gap).flatten(1).mean(1)
    bins = torch.bucketize(sigma_s, torch.tensor(EDGES[1:-1]))
    params = [p for p in nets["generator"].parameters() if p.requires_grad]
    results = {}
    for weight in ("edm", "edm-bounded", "uniform"):
        w = loss_weight(weight, sigma_s, method.sigma_data, method.sigma_floor)
        norms = []
        for b in range(len(EDGES) - 1):
            mask = bins == b
            if not mask.any():
                norms.append(0.0)
                continue
            grads = torch.autograd.grad((w * per_sample)[mask].sum(), params, retain_graph=True, allow_unused=True)
            norms.append(float(torch.sqrt(sum(g.square().sum() for g in grads if g is not None))))
        results[weight] = norms
    counts = [int((bins == b).sum()) for b in range(len(EDGES) - 1)]
    return counts, results


@click.command()
@click.option("--state", "state_path", required=True, help="training-state-<step>.pt of a train_mm.py run")
@click.option("--num", type=click.IntRange(min=16), default=1024, show_default=True, help="Samples in the batch")
@click.option("--seed", type=int, default=123, show_default=True)
@user_errors
def main(state_path, num, seed):
    """Print the per-σ-bin sample and gradient shares (markdown) for each weighting."""
    torch.set_grad_enabled(True)
    method, nets, step = _build(state_path)
    counts, results = _bin_gradients(method, nets, num, seed)
    print(f"{state_path} (step {step}), {num} samples of one generator step\n")
    heads = [f"[{lo:g}, {hi:.3g})" for lo, hi in zip(EDGES[:-1], EDGES[1:])]
    print("| σ_s bin | " + " | ".join(heads) + " |")
    print("|---|" + "---:|" * len(heads))
    print("| samples | " + " | ".join(f"{c / num:.2f}" for c in counts) + " |")
    for weight, norms in results.items():
        total = sum(norms) or 1.0
        print(f"| gradient, w = {weight} | " + " | ".join(f"{n / total:.2f}" for n in norms) + " |")


if __name__ == "__main__":
    main()  # pylint: disable=no-value-for-parameter
