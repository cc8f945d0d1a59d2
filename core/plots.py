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


def training_curves(path: str, train: list[tuple[int, float]], evals: list[tuple[int, float]],
                    title: str) -> str:
    """Training loss and held-out BCE against the step."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if train:
        ax.plot(*zip(*train), label="training loss (mean over the log window)")
    if evals:
        ax.plot(*zip(*evals), marker="o", markersize=4, label="eval BCE (whole eval split)")
    ax.set_xlabel("step")
    ax.set_ylabel("binary cross-entropy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pca_2d(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Projects flattened codes (N, D) onto their two principal components; returns the
    (N, 2) projection and the explained-variance ratios of the two components."""
    x = codes.reshape(len(codes), -1).astype(np.float64)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    variance = s**2 / max((s**2).sum(), 1e-12)
    return x @ vt[:2].T, variance[:2]


def latent_space(path: str, codes: np.ndarray, labels: np.ndarray, title: str) -> str:
    """The codes' 2-D PCA projection, one colour per label."""
    points, variance = pca_2d(codes)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    cmap = plt.get_cmap("tab10")
    for label in np.unique(labels):
        mask = labels == label
        ax.scatter(points[mask, 0], points[mask, 1], s=4, alpha=0.6, color=cmap(int(label) % 10),
                   label=str(label))
    ax.set_xlabel(f"PC 1 ({100 * variance[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * variance[1]:.0f}% of variance)")
    ax.set_title(title, fontsize=10)
    ax.legend(title="label", markerscale=4, fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def interpolation_strip(path: str, images: np.ndarray, title: str) -> str:
    """One row: decoded images along the straight line between two codes, the two real
    inputs at the ends (outlined)."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(1.2 * n + 0.4, 1.9))
    for i, ax in enumerate(axes):
        image = images[i]
        ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        if i in (0, n - 1):
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:orange")
                spine.set_linewidth(2)
            ax.set_xlabel("input", fontsize=8)
        else:
            ax.set_xlabel(f"t={(i - 1) / (n - 3):.2f}" if n > 3 else "", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
