"""`fontdigits`: an MNIST-like dataset made offline from the fonts matplotlib ships.

Each (font, digit, stroke width) glyph is drawn once at twice the final
resolution, centred in a 20x20 box of the 28x28 frame as MNIST's digits are;
every example is then one glyph under a random rotation, scale, shear and shift
(one batched bilinear warp in TensorFlow), averaged down to 28x28 and stored as
uint8. Everything random comes from numpy's PCG64 seeded by (seed, split), so
the same seed gives the same bytes on the same library versions. Building the
default 60,000 + 10,000 examples takes a few seconds; the result is cached.
"""

from __future__ import annotations

import hashlib
import os

from absl import logging
import numpy as np

GENERATOR_VERSION = 1  # bump when the rendering changes, so caches are rebuilt
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf",
    "cmtt10.ttf", "cmb10.ttf",
)
STROKE_WIDTHS = (0.0, 1.5, 3.0)  # outline width in pixels at the drawing resolution
SPLIT_SIZES = {"train": 60_000, "test": 10_000}
_RENDER = 56  # drawing resolution: 2x the output
_OUT = 28


def _font_paths() -> list[str]:
    import matplotlib

    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    return [os.path.join(folder, f) for f in FONT_FILES if os.path.exists(os.path.join(folder, f))]


def render_glyphs() -> np.ndarray:
    """All glyphs: float32 (fonts * 10 * len(STROKE_WIDTHS), 56, 56) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import PathPatch
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    dpi = 72  # 1 point = 1 pixel
    fig = Figure(figsize=(_RENDER / dpi, _RENDER / dpi), dpi=dpi, facecolor="black")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, _RENDER)
    ax.set_ylim(0, _RENDER)
    ax.axis("off")
    box = _RENDER * 20 / 28  # MNIST digits fit a 20x20 box in the 28x28 frame
    glyphs = []
    for font in _font_paths():
        prop = FontProperties(fname=font)
        for digit in range(10):
            path = TextPath((0, 0), str(digit), size=100, prop=prop)
            (x0, y0), (x1, y1) = path.get_extents().get_points()
            scale = box / max(x1 - x0, y1 - y0)
            centre = Affine2D().translate(-(x0 + x1) / 2, -(y0 + y1) / 2).scale(scale)
            placed = centre.translate(_RENDER / 2, _RENDER / 2).transform_path(path)
            for width in STROKE_WIDTHS:
                patch = ax.add_patch(PathPatch(
                    placed, facecolor="white", edgecolor="white", linewidth=width,
                    antialiased=True))
                canvas.draw()
                glyphs.append(np.asarray(canvas.buffer_rgba())[:, :, 0].astype(np.float32) / 255)
                patch.remove()
    return np.stack(glyphs)


def _random_affines(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 8) projective transforms mapping output to input pixels, for ImageProjectiveTransformV3."""
    angle = np.deg2rad(rng.uniform(-15, 15, n))
    scale = rng.uniform(0.8, 1.15, n)
    shear = rng.uniform(-0.2, 0.2, n)
    shift = rng.uniform(-2.5, 2.5, (n, 2)) * (_RENDER / _OUT)
    c = (_RENDER - 1) / 2
    cos, sin = np.cos(angle), np.sin(angle)
    # Inverse of: scale, shear, rotate about the centre, then shift.
    a = cos / scale
    b = (sin + shear * cos) / scale
    d = -sin / scale
    e = (cos - shear * sin) / scale
    ox, oy = c + shift[:, 0], c + shift[:, 1]
    tx = c - a * ox - b * oy
    ty = c - d * ox - e * oy
    zeros = np.zeros(n)
    return np.stack([a, b, tx, d, e, ty, zeros, zeros], axis=1).astype(np.float32)


def build(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Renders the dataset: {split: ((N, 28, 28, 1) uint8 images, (N,) int64 labels)}."""
    import tensorflow as tf

    sizes = sizes or SPLIT_SIZES
    glyphs = render_glyphs()
    per_digit = len(glyphs) // 10  # glyphs are ordered font, digit, width
    out = {}
    for split_index, (split, n) in enumerate(sorted(sizes.items())):
        rng = np.random.default_rng([seed, split_index])
        labels = rng.permutation(np.arange(n) % 10)
        variant = rng.integers(0, per_digit, n)  # font and stroke width
        font, width = np.divmod(variant, len(STROKE_WIDTHS))
        glyph_index = (font * 10 + labels) * len(STROKE_WIDTHS) + width
        contrast = rng.uniform(0.75, 1.0, n).astype(np.float32)
        transforms = _random_affines(rng, n)
        images = np.empty((n, _OUT, _OUT, 1), np.uint8)
        for start in range(0, n, 10_000):  # bounded memory
            sl = slice(start, start + 10_000)
            warped = tf.raw_ops.ImageProjectiveTransformV3(
                images=tf.constant(glyphs[glyph_index[sl], :, :, None]),
                transforms=tf.constant(transforms[sl]),
                output_shape=tf.constant([_RENDER, _RENDER]), fill_value=0.0,
                interpolation="BILINEAR", fill_mode="CONSTANT")  # (n, 56, 56, 1)
            small = tf.nn.avg_pool2d(warped, 2, 2, "VALID").numpy()  # (n, 28, 28, 1)
            small *= contrast[sl, None, None, None]
            images[sl] = np.clip(np.rint(small * 255), 0, 255).astype(np.uint8)
        out[split] = (images, labels.astype(np.int64))
    return out


def cache_dir() -> str:
    return os.environ.get("TAPELOOP_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "tapeloop")


def load(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Like `build`, through a cache file keyed by everything that changes the bytes."""
    import matplotlib

    sizes = sizes or SPLIT_SIZES
    key = (GENERATOR_VERSION, seed, sorted(sizes.items()), matplotlib.__version__,
           [os.path.basename(p) for p in _font_paths()])
    return cached("fontdigits", key, list(sizes), lambda: build(seed, sizes))


def cached(name: str, key, splits: list[str], make) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images, labels)} from `<cache_dir>/<name>-<hash of key>.npz`, or `make()`
    written there (atomically: concurrent builders never see a half-written cache). A
    damaged cache is rebuilt; an unwritable cache dir means building every time."""
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{name}-{digest}.npz")
    if os.path.isfile(path):
        try:
            with np.load(path) as f:
                return {s: (f[f"{s}_images"], f[f"{s}_labels"]) for s in splits}
        except Exception as e:  # noqa: BLE001 - truncated zip, empty file, missing key...
            logging.warning("the %s cache %s is damaged (%s): rebuilding it", name, path,
                            type(e).__name__)
    data = make()
    arrays = {f"{s}_{k}": v for s, (im, lb) in data.items() for k, v in (("images", im), ("labels", lb))}
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("cannot cache %s in %s (%s): set TAPELOOP_CACHE_DIR to a "
                        "writable folder to skip the rebuild next time", name, cache_dir(),
                        e.strerror or e)
        if os.path.exists(tmp):
            os.remove(tmp)
    return data
