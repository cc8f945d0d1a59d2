"""`shapes`: an offline colour dataset, 64x64x3, generated and cached like fontdigits.

Each image is a two-colour linear gradient in a random direction, with one to
four filled shapes on it (discs, rectangles, triangles), each a random colour,
some striped or checkered, plus a little pixel noise. The label is the kind of
the largest shape (0 disc, 1 rectangle, 2 triangle), for the latent-space plot.
Everything random comes from numpy's PCG64 seeded by (seed, split, block), so
the same seed gives the same bytes. Why generated and not photographs: the only
package we depend on that ships photographs, matplotlib, ships one.
"""

from __future__ import annotations

import numpy as np

GENERATOR_VERSION = 1
SPLIT_SIZES = {"train": 10_000, "test": 1_000}
SIZE = 64
CLASS_NAMES = ("disc", "rectangle", "triangle")
_BLOCK = 500  # images per seed: any split size gives the same first images


def _image(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, int]:
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0  # [0, 1] across the frame
    c0, c1 = rng.uniform(0, 1, (2, 3))
    img = c0 + (c1 - c0) * t[..., None]
    largest, kind_of_largest = -1.0, 0
    for _ in range(rng.integers(1, 5)):
        kind = int(rng.integers(0, 3))
        cy, cx = rng.uniform(-0.6, 0.6, 2)
        r = rng.uniform(0.15, 0.5)
        if kind == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            area = np.pi * r * r
        elif kind == 1:
            h, w = rng.uniform(0.4, 1.0, 2) * r
            mask = (np.abs(yy - cy) < h) & (np.abs(xx - cx) < w)
            area = 4 * h * w
        else:
            a = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
            py, px = cy + r * np.sin(a), cx + r * np.cos(a)
            side = [(xx - px[i]) * (py[(i + 1) % 3] - py[i]) - (yy - py[i]) * (px[(i + 1) % 3] - px[i])
                    for i in range(3)]
            mask = ((side[0] >= 0) & (side[1] >= 0) & (side[2] >= 0)) | (
                (side[0] <= 0) & (side[1] <= 0) & (side[2] <= 0))
            area = 3 * np.sqrt(3) / 4 * r * r
        colour = rng.uniform(0, 1, 3)
        texture = rng.integers(0, 3)
        if texture == 1:  # stripes
            period = rng.uniform(0.08, 0.25)
            phase = np.sin((np.cos(angle) * yy - np.sin(angle) * xx) / period * np.pi) > 0
            fill = np.where(phase[..., None], colour, colour * 0.5)
        elif texture == 2:  # checks
            period = rng.uniform(0.1, 0.3)
            check = (np.floor(yy / period) + np.floor(xx / period)) % 2 == 0
            fill = np.where(check[..., None], colour, 1 - colour)
        else:
            fill = np.broadcast_to(colour, img.shape)
        img = np.where(mask[..., None], fill, img)
        if area > largest:
            largest, kind_of_largest = area, kind
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), kind_of_largest


def build(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Generates {split: ((N, 64, 64, 3) uint8 images, (N,) int64 labels)}."""
    sizes = sizes or SPLIT_SIZES
    axis = (np.arange(SIZE) + 0.5) / SIZE * 2 - 1
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    out = {}
    for split_index, (split, n) in enumerate(sorted(sizes.items())):
        images = np.empty((n, SIZE, SIZE, 3), np.uint8)
        labels = np.empty(n, np.int64)
        for i in range(n):
            if i % _BLOCK == 0:
                rng = np.random.default_rng([seed, split_index, i // _BLOCK])
            images[i], labels[i] = _image(rng, yy, xx)
        out[split] = (images, labels)
    return out


def load(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Like `build`, through a cache file in fontdigits' cache folder."""
    from core.fontdigits import cached

    sizes = sizes or SPLIT_SIZES
    key = (GENERATOR_VERSION, seed, sorted(sizes.items()), np.__version__.split(".")[0])
    return cached("shapes", key, list(sizes), lambda: build(seed, sizes))
