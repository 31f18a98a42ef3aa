"""Digit glyphs rendered at run time with numpy only (no fonts), for the built-in analytic teachers.

Each digit is a handful of polylines in a unit box (x right, y down). A pixel's value is the fraction of its
4x4 sub-samples that lie within half a stroke width of some segment: anti-aliased, and identical on every run.
"""

import math
from typing import List, Sequence, Tuple

import numpy as np

__all__ = ["DIGIT_STROKES", "render_glyph", "glyph_means"]


def _arc(cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float, n: int = 24):
    """Points along an elliptic arc; angles in degrees, 0 = right, 90 = down."""
    angles = np.linspace(math.radians(start_deg), math.radians(end_deg), n)
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


# Polylines per digit, coordinates in the unit box.
DIGIT_STROKES = {
    0: [_arc(0.5, 0.5, 0.4, 0.47, 0, 360, 32)],
    1: [[(0.25, 0.22), (0.55, 0.02), (0.55, 0.98)], [(0.3, 0.98), (0.8, 0.98)]],
    2: [_arc(0.5, 0.3, 0.38, 0.27, 190, 380, 16) + [(0.1, 0.97), (0.92, 0.97)]],
    3: [_arc(0.48, 0.27, 0.36, 0.24, 200, 450, 16), _arc(0.48, 0.73, 0.4, 0.25, 270, 520, 16)],
    4: [[(0.72, 0.98), (0.72, 0.02), (0.06, 0.68), (0.95, 0.68)]],
    5: [[(0.88, 0.03), (0.2, 0.03), (0.14, 0.45)] + _arc(0.48, 0.66, 0.4, 0.31, 220, 500, 18)],
    6: [_arc(0.5, 0.68, 0.38, 0.3, 0, 360, 24), [(0.12, 0.68), (0.25, 0.3), (0.6, 0.02)]],
    7: [[(0.08, 0.03), (0.92, 0.03), (0.38, 0.98)], [(0.3, 0.52), (0.78, 0.52)]],
    8: [_arc(0.5, 0.27, 0.3, 0.24, 0, 360, 24), _arc(0.5, 0.73, 0.38, 0.25, 0, 360, 24)],
    9: [_arc(0.5, 0.32, 0.38, 0.3, 0, 360, 24), [(0.88, 0.32), (0.75, 0.7), (0.4, 0.98)]],
}

# Variant tables: component j of class c takes entries chosen by simple arithmetic (no RNG, so no dependence
# on numpy's random streams). The components of a class differ mainly in their background, a large colour offset
# over the whole image, as real images differ mostly in low frequencies: which component the teacher's ODE picks
# for a noise is then decided by coarse statistics of that noise (its per-channel means), which a convolutional
# student learns quickly (bench/glyph_probe.py measures this).
_BACKGROUNDS = [(0.05, 0.05, 0.5), (0.55, 0.05, 0.05), (0.05, 0.5, 0.1), (0.5, 0.45, 0.05), (0.06, 0.06, 0.06)]
# The glyph is its background lightened by the same amount in every component (blue -> light blue, red -> pink,
# ...), and a class's components share the glyph's size and position: the difference of two components' means is
# then a constant per channel (>99.8% of its energy), so the ODE's choice depends on the noise's channel means
# alone. Moving or resizing the glyph within a class, even by a pixel, puts a large share of that difference into
# high frequencies (measured: 50-88% of the energy left in channel means).
_LIGHTEN = 0.5
_SIZES = [0.8, 0.66, 0.74, 0.6, 0.7]
# Means span [-0.85, 0.85], not [-1, 1]: with the mixture's std 0.05 almost no exact sample leaves [-1, 1], so
# clamping generated images to [-1, 1] (as every sampler's output is saved) barely moves them off the ODE endpoint.
_CONTRAST = 0.85
_OFFSETS = [(0.0, 0.0), (-0.12, -0.08), (0.12, 0.08), (0.12, -0.08), (-0.12, 0.08), (0.0, -0.09), (0.0, 0.09)]


def _segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distance of points [M,2] to the segment a-b."""
    ab = b - a
    denom = float(ab @ ab)
    t = np.clip(((points - a) @ ab) / denom, 0.0, 1.0) if denom > 0 else np.zeros(len(points))
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


def render_glyph(digit: int, resolution: int, height: float, center: Tuple[float, float],
                 stroke: float = 0.14, supersample: int = 4) -> np.ndarray:
    """Coverage in [0,1], float64 [resolution, resolution], of `digit` drawn in a box of the given height.

    height: box height as a fraction of the image; the box is 0.6 as wide. center: box centre (x, y) in [0,1].
    stroke: line width as a fraction of the box height.
    """
    n = resolution * supersample
    coords = (np.arange(n) + 0.5) / n
    grid = np.stack(np.meshgrid(coords, coords, indexing="xy"), axis=-1).reshape(-1, 2)
    box = np.array([0.6 * height, height])
    origin = np.array(center) - box / 2
    dist = np.full(len(grid), np.inf)
    for line in DIGIT_STROKES[digit]:
        pts = origin + np.array(line) * box
        for a, b in zip(pts[:-1], pts[1:]):
            dist = np.minimum(dist, _segment_distance(grid, a, b))
    inside = (dist <= stroke * height / 2).astype(np.float64).reshape(n, n)
    return inside.reshape(resolution, supersample, resolution, supersample).mean(axis=(1, 3))


def glyph_means(resolution: int, per_class: int) -> Tuple[np.ndarray, List[int]]:
    """Component means for a 10-class glyph mixture: float64 [10*per_class, 3, R, R] in [-0.85,0.85], and labels.

    Component j of class c shows digit c with its own background colour (a large whole-image offset) and a glyph
    of that colour lightened; size and position depend on the class only.
    """
    means, labels = [], []
    for c in range(10):
        for j in range(per_class):
            bg = np.array(_BACKGROUNDS[(c + j) % len(_BACKGROUNDS)])
            fg = np.minimum(bg + _LIGHTEN, 1.0)
            height = _SIZES[c % len(_SIZES)]            # layout per class, shared by its components
            ox, oy = _OFFSETS[c % len(_OFFSETS)]
            # keep the whole glyph inside the image whatever the size
            cx = float(np.clip(0.5 + ox, 0.3 * height + 0.04, 1 - 0.3 * height - 0.04))
            cy = float(np.clip(0.5 + oy, 0.5 * height + 0.04, 1 - 0.5 * height - 0.04))
            cov = render_glyph(c, resolution, height, (cx, cy))
            rgb = bg[:, None, None] + cov[None] * (fg - bg)[:, None, None]
            means.append((rgb * 2 - 1) * _CONTRAST)
            labels.append(c)
    return np.stack(means), labels
