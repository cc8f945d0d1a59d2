"""Matplotlib figures written as PNGs into the model dir."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def reconstruction_grid(path: str, rows: list[np.ndarray], labels: list[str], title: str) -> str:
    """The tutorial's picture: one row of images per entry of `rows` (n, H, W, C) in [0, 1],
    e.g. test inputs above their reconstructions."""
    n = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.3 * n + 1, 1.45 * len(rows) + 0.5),
                             squeeze=False)
    for r, (row, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            ax = axes[r, c]
            image = row[c]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image,
                      cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, fontsize=11)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
