"""Parity of edm_networks with EDM's own outputs, and a smoke run of the full-size presets.

    python bench/edm_networks_parity.py                 # worst error per golden network file (markdown table)
    python bench/edm_networks_parity.py --full          # + build every preset (random init) and run batch 1
    python bench/edm_networks_parity.py --full --device cuda

The vectors folder defaults to ../shared/edm_vectors (override with PID_EDM_VECTORS).
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from edm_networks import PRECOND_CLASSES, build_preset, list_presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.environ.get("PID_EDM_VECTORS", os.path.join(os.path.dirname(ROOT), "shared", "edm_vectors"))


def golden_errors(path: str) -> list:
    """[(output name, max abs error, max abs error / max|D_ref|)] for one golden network file."""
    d = torch.load(path, weights_only=True)
    kw = d["init_kwargs"]
    net = PRECOND_CLASSES[kw["precond_class"]](**kw["edm_constructor_kwargs"])
    net.load_state_dict(d["state_dict"])
    net.eval()
    calls = {"D": (d["sigma"], d["class_labels"], {}), "D_scalar_sigma": (d["sigma_scalar"], d["class_labels"], {}),
             "D_no_labels": (d["sigma"], None, {}),
             "D_augment": (d["sigma"], d["class_labels"], {"augment_labels": d.get("augment_labels")})}
    rows = []
    with torch.no_grad():
        for key, (sigma, labels, extra) in calls.items():
            if key not in d:
                continue
            err = (net(d["x"], sigma, labels, **extra).double() - d[key].double()).abs().max().item()
            rows.append((key, err, err / d[key].abs().max().item()))
    return rows


def parity_table() -> None:
    print("| file | precond / model | outputs checked | worst abs error | worst error / max abs(D) |")
    print("|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(VECTORS, "*.pt"))):
        d = torch.load(path, weights_only=True)
        if "init_kwargs" not in d:
            continue
        rows = golden_errors(path)
        worst_abs = max(r[1] for r in rows)
        worst_rel = max(r[2] for r in rows)
        kw = d["init_kwargs"]
        print(f"| {os.path.basename(path)} | {kw['precond_class']} / {kw['model_class']} | "
              f"{', '.join(r[0] for r in rows)} | {worst_abs:.2e} | {worst_rel:.2e} |")


def full_size_smoke(device: str) -> None:
    print("\n| preset | params | build (s) | forward batch 1 (s) | output | finite |")
    print("|---|---|---|---|---|---|")
    for name in list_presets():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        net = build_preset(name).to(device).eval()
        t1 = time.perf_counter()
        r, c = net.img_resolution, net.img_channels
        x = torch.randn(1, c, r, r, device=device) * 10
        labels = torch.eye(net.label_dim, device=device)[:1] if net.label_dim else None
        with torch.no_grad():
            net(x, torch.tensor([10.0], device=device), labels)  # warm-up (kernel selection on CUDA)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            out = net(x, torch.tensor([10.0], device=device), labels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t3 = time.perf_counter()
        params = sum(p.numel() for p in net.parameters())
        print(f"| {name} | {params:,} | {t1 - t0:.1f} | {t3 - t2:.3f} | {list(out.shape)} {out.dtype} | "
              f"{bool(torch.isfinite(out).all())} |")
        del net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="also build and run every full-size preset")
    parser.add_argument("--device", default="cpu", help="device for --full (cpu, cuda)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, vectors {VECTORS}\n")
    parity_table()
    if args.full:
        full_size_smoke(args.device)


if __name__ == "__main__":
    main()
