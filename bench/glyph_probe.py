"""Probe: can the within-class mixture component that the teacher's ODE picks be read off coarse noise statistics?

For seeds 0..num-1 (EDM's per-seed latents and labels) it solves the built-in teacher's ODE (Heun, float64),
takes each endpoint's mixture component, and fits a multinomial logistic classifier (one model per class) from the per-channel means of the latent to the within-class component index on the first half of the
seeds; it reports its accuracy on the second half. A high score means the ODE's choice depends on low-frequency
content of the noise, which a convolutional student learns quickly.

    python bench/glyph_probe.py --teacher=glyphs16 --num=1000 --steps=128
"""

from __future__ import annotations

import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def softmax_fit(x: torch.Tensor, y: torch.Tensor, k: int, l2: float = 1e-4):
    """Multinomial logistic regression (L-BFGS, small L2) of labels y [N] in 0..k-1 on x [N,F]; returns the scorer."""
    w = torch.zeros(x.shape[1], k, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w, y) + l2 * w[:-1].square().sum()
        loss.backward()
        return loss
    opt.step(closure)
    return lambda xt: xt @ w.detach()


def coarse_accuracy(feats: torch.Tensor, comp: torch.Tensor, cls: torch.Tensor) -> tuple[float, float]:
    """Held-out accuracy of per-class logistic classifiers on feats [N,F]; and majority baseline."""
    n = feats.shape[0]
    train = torch.arange(n) < n // 2
    feats = (feats - feats.mean(0)) / feats.std(0)                 # unit scale: the L2 term is then neutral
    x = torch.cat([feats, torch.ones(n, 1, dtype=feats.dtype)], dim=1)
    correct, majority, total = 0, 0, 0
    for c in cls.unique():
        tr, te = train & (cls == c), ~train & (cls == c)
        if te.sum() == 0:
            continue
        comps = comp[cls == c].unique()
        pred = comps[softmax_fit(x[tr], torch.searchsorted(comps, comp[tr]), len(comps))(x[te]).argmax(1)]
        correct += int((pred == comp[te]).sum())
        majority += int((comp[te] == torch.mode(comp[tr]).values).sum())
        total += int(te.sum())
    return correct / total, majority / total


@click.command()
@click.option("--teacher", "name", default="glyphs16", help="Built-in teacher name")
@click.option("--num", type=int, default=1000, help="Seeds 0..num-1")
@click.option("--steps", type=int, default=128, help="Heun steps of the reference ODE solve")
def main(name: str, num: int, steps: int) -> None:
    """Print the coarse (channel-mean) predictor's held-out accuracy for the within-class component."""
    from pid.exact_eval import reference_endpoints
    from pid.metrics.evaluate import seed_inputs
    from pid.toy import builtin_teacher
    teacher = builtin_teacher(name)
    shape = tuple(teacher.means.shape[1:])
    latents, labels = seed_inputs(list(range(num)), shape, 10, torch.device("cpu"))
    ref = reference_endpoints(teacher, latents.double(), labels.double(), num_steps=steps)
    comp = teacher.component_of(ref, labels.double())
    cls = labels.argmax(1)
    feats = latents.double().mean(dim=(2, 3))                       # [N,C] per-channel means
    acc, base = coarse_accuracy(feats, comp, cls)
    quad = latents.double().reshape(num, shape[0], 2, shape[1] // 2, 2, shape[2] // 2).mean(dim=(3, 5))
    acc4, _ = coarse_accuracy(quad.flatten(1), comp, cls)           # [N,C*4] per-channel quadrant means
    print(f"{name}: {num} seeds, {steps} Heun steps; held-out accuracy from channel means {acc:.3f}, "
          f"from channel x quadrant means {acc4:.3f}, majority baseline {base:.3f}")


if __name__ == "__main__":
    main()
