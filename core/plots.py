"""Matplotlib figures written as PNGs into the model dir."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


MAX_COLUMNS = 16  # wider grids wrap into bands of rows
MAX_LEGEND_LABELS = 20  # the latent-space figure's legend; more labels get a colour scale


def _fit(title: str, fig, fontsize: float) -> str:
    """`title` broken into lines that fit the figure's width (a long run name or split would
    otherwise run off its edges): ~0.6 em a character."""
    import textwrap

    return textwrap.fill(title, max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize))))


def _save(fig, path: str) -> None:
    """PNG through tf.io.gfile, so gs:// and ram:// model dirs get their figures."""
    import io

    from core import process

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    # A continuous evaluation and its training run may both redraw a figure, and a viewer
    # must never read half of one.
    process.write_file(path, buffer.getvalue())


def wrap_rows(rows: list[np.ndarray], labels: list[str],
              columns: int = MAX_COLUMNS) -> tuple[list[np.ndarray], list[str]]:
    """Cuts rows of n images into bands of at most `columns`, keeping each band's rows
    together (inputs above their reconstructions); the last band is padded with blanks."""
    n = rows[0].shape[0]
    if n <= columns:
        return rows, labels
    bands = -(-n // columns)
    out_rows, out_labels = [], []
    for band in range(bands):
        for row, label in zip(rows, labels):
            part = row[band * columns:(band + 1) * columns]
            if len(part) < columns:
                part = np.concatenate([part, np.zeros((columns - len(part), *part.shape[1:]),
                                                      part.dtype)])
            out_rows.append(part)
            out_labels.append(label)
    return out_rows, out_labels


def reconstruction_grid(path: str, rows: list[np.ndarray], labels: list[str], title: str) -> str:
    """The tutorial's picture: one row of images per entry of `rows` (n, H, W, C) in [0, 1],
    e.g. test inputs above their reconstructions; more than 16 columns wrap into bands."""
    rows, labels = wrap_rows(rows, labels)
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
    fig.suptitle(_fit(title, fig, 11), fontsize=11)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def loss_changes(named: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """(step, loss name) where the loss changed, from each start's (step, name)."""
    return [(step, name) for i, (step, name) in enumerate(named)
            if i == 0 or name != named[i - 1][1]]


def loss_label(loss_name: str, changes: Sequence[tuple[int, str]] = ()) -> str:
    """The loss as the curves name it: `loss_name`, or with `changes` (step, name) where a
    resumed run changed it, each name in turn ('L1, then BCE after step 20')."""
    if len(changes) < 2:
        return loss_name
    return changes[0][1] + "".join(f", then {name} after step {step}"
                                   for step, name in changes[1:])


def training_curves(path: str, train: list[tuple[int, float]], evals: list[tuple[int, float]],
                    title: str, loss_name: str = "BCE",
                    named: Sequence[tuple[int, str]] = ()) -> str:
    """Training loss (named `loss_name`) and the same loss on the eval split, against the step.
    `named`: (step, loss name) of each start; where a resumed run changed the loss, the
    names follow in turn and a line marks the step.
    """
    fig, ax = plt.subplots(figsize=(6.4, 4))
    changes = loss_changes(named)
    loss_name = loss_label(loss_name, changes)
    for step, _ in changes[1:]:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    if train:  # a marker, so that a single point shows
        ax.plot(*zip(*train), marker="." if len(train) < 50 else None,
                label=f"training: {loss_name}, mean per log window")
    if evals:
        ax.plot(*zip(*evals), marker="o", markersize=4, label=f"eval: {loss_name} (whole eval split)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(_fit(title, fig, 10), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    _save(fig, path)
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


def label_names(labels, class_names=()) -> list[tuple[int, str]]:
    """(label, its name) for each label: the class name where there is one, else the
    number."""
    return [(int(label), class_names[label] if 0 <= label < len(class_names) else str(label))
            for label in labels]


def latent_space(path: str, codes: np.ndarray, labels: np.ndarray, title: str,
                 class_names=()) -> str:
    """The codes' 2-D PCA projection, one colour per label, named by `class_names` where
    given. Up to 20 labels get distinct colours and a legend; more, a colour scale."""
    points, variance = pca_2d(codes)
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    present = np.unique(labels)
    size = float(np.clip(2000 / len(points), 4, 36))  # a few codes get dots one can see
    if len(present) <= MAX_LEGEND_LABELS:
        cmap = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
        for i, (label, name) in enumerate(label_names(present, class_names)):
            mask = labels == label
            ax.scatter(points[mask, 0], points[mask, 1], s=size, alpha=0.6, color=cmap(i),
                       label=name)
        ax.legend(title="label", markerscale=8 / np.sqrt(size), fontsize=8, loc="best")
    else:
        dots = ax.scatter(points[:, 0], points[:, 1], s=size, alpha=0.6, c=labels, cmap="turbo")
        fig.colorbar(dots, ax=ax, label=f"label ({len(present)} of them)")
    ax.set_xlabel(f"PC 1 ({100 * variance[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * variance[1]:.0f}% of variance)")
    ax.set_title(_fit(title, fig, 10), fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def interpolation_pair(labels: np.ndarray | None, n: int) -> tuple[int, int]:
    """Indices of two of `n` examples to interpolate between: the first, and the first
    with another label (the second example without labels, the first if n == 1)."""
    if labels is not None and (labels[:n] != labels[0]).any():
        return 0, int(np.argmax(labels[:n] != labels[0]))
    return 0, min(1, n - 1)


def interpolate(code_a: np.ndarray, code_b: np.ndarray, steps: int) -> np.ndarray:
    """`steps` codes on the straight line from `code_a` to `code_b`, ends included:
    (steps, *code shape)."""
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32).reshape(-1, *[1] * code_a.ndim)
    return code_a[None] * (1 - t) + code_b[None] * t


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
    fig.suptitle(_fit(title, fig, 10), fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
