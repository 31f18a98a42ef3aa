"""Test helpers for pid.metrics and fid.py: small TorchScript detectors of the real formats, PNG folders."""

import os
import warnings
from typing import Iterable

import numpy as np
import torch
from PIL import Image


class IntegerDetector(torch.nn.Module):
    """Stand-in detector with exact integer features (the recipe recorded in fid_golden.pt).

    features = flattened uint8 pixels (int) @ W, W ~ RandomState(seed).randint(-3, 4, [3*res*res, dim]).
    Computed in float64 (exact for these integers), returned as float32 like the recipe.
    """

    def __init__(self, res: int = 16, dim: int = 2048, seed: int = 1234):
        super().__init__()
        w = np.random.RandomState(seed).randint(-3, 4, size=(3 * res * res, dim)).astype(np.float64)
        self.register_buffer("weight", torch.from_numpy(w))

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = img.to(torch.float64).reshape(img.shape[0], -1)
        return (x @ self.weight).to(torch.float32)


class TinyInception(torch.nn.Module):
    """Same interface and output sizes as NVIDIA's inception-2015-12-05.pt, random weights, tiny body.

    forward(uint8 [N,3,H,W], return_features, use_fp16, no_output_bias): resize, (x-128)/128, conv, pool ->
    features [N, dim=2048]; otherwise softmax over 1008 logits (bias dropped with no_output_bias).
    """

    def __init__(self, seed: int = 0, dim: int = 2048, classes: int = 1008):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8 * 4, dim)
        self.output = torch.nn.Linear(dim, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(img.to(torch.float32), size=[17, 17], mode="bilinear",
                                            align_corners=False)
        x = torch.relu(self.conv((x - 128.0) / 128.0))
        x = torch.nn.functional.adaptive_avg_pool2d(x, [2, 2]).flatten(1)
        features = torch.relu(self.fc(x))
        if return_features:
            return features
        if no_output_bias:
            logits = torch.nn.functional.linear(features, self.output.weight)
        else:
            logits = self.output(features)
        return torch.softmax(logits, dim=1)


def save_torchscript(module: torch.nn.Module, path: str) -> str:
    """Script `module` and save it as a TorchScript archive at `path`."""
    with warnings.catch_warnings():  # torch >= 2.9 marks TorchScript deprecated; the format is what we test
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(module.eval()).save(path)
    return path


def write_pngs(folder: str, arrays: Iterable[np.ndarray], names: Iterable[str]) -> None:
    """Write uint8 HWC (or HW) arrays as PNGs at folder/name (creating subfolders)."""
    for array, name in zip(arrays, names):
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(array).save(path)


def golden_recipe_folder(folder: str, n: int, seed: int, res: int = 16) -> None:
    """The fid_golden.pt image recipe: one RandomState per folder, image i at {i//1000*1000:06d}/{i:06d}.png."""
    rs = np.random.RandomState(seed)
    arrays = (rs.randint(0, 256, size=(res, res, 3), dtype=np.uint8) for _ in range(n))
    write_pngs(folder, arrays, (f"{(i // 1000) * 1000:06d}/{i:06d}.png" for i in range(n)))


def random_images(n: int, seed: int, res: int = 16, low: int = 0, high: int = 256) -> np.ndarray:
    """n random uint8 images [n, res, res, 3] with values in [low, high)."""
    return np.random.RandomState(seed).randint(low, high, size=(n, res, res, 3), dtype=np.uint8)
