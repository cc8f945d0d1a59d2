"""Your own images: folders and TFRecord shards, decoded by the real decoders from real
files the tests write; their order, resume, sharding, and remote (ram://) storage."""

import io
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import core
from core import data, images, prepare, sources
from core.checkpoints import ModelDirLock
from core.config import Config
from core.errors import CheckpointError, ConfigError, DataError


def colour_images(n, h=24, w=32, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))
    ramp = np.linspace(0, 60, w, dtype=np.int64)[None, None, :, None]
    return np.clip(base + ramp + rng.integers(-8, 9, (n, h, w, 3)), 0, 255).astype(np.uint8)


def save(path, array, fmt=None, mode=None):
    """Writes `array` (H, W, 3) as a real image file, through gfile (so ram:// works)."""
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buffer = io.BytesIO()
    fmt = fmt or os.path.splitext(path)[1][1:].upper().replace("JPG", "JPEG")
    img.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())
    return buffer.getvalue()


def png_tree(root, splits=(("train", 40), ("test", 12)), classes=("cat", "dog"), seed=0):
    """train/<class>/NNN.png ... : lossless, so decoded pixels are known exactly."""
    out = {}
    for split, n in splits:
        arrays = colour_images(n, seed=seed + len(split))
        for i, a in enumerate(arrays):
            save(os.path.join(root, split, classes[i % len(classes)], f"{i:03d}.png"), a)
        out[split] = arrays
    return out


def _first_batches(ds, k):
    return [b.numpy() for b in ds.take(k)]


# ------------------------------------------------------------------ folders
def test_folder_splits_labels_and_sorted_order(tmp_path):
    arrays = png_tree(str(tmp_path))
    opened = data.open_split("train", "folder", str(tmp_path))
    src = opened.source
    assert src.num_examples == 40 and src.image_shape == (24, 32, 3)
    assert src.class_names == ["cat", "dog"]
    # Sorted paths: cat/000, cat/002, ..., dog/001, ...; labels from the first folder level.
    names = [os.path.relpath(p, tmp_path) for p in src.paths]
    assert names == sorted(names) and names[0] == os.path.join("train", "cat", "000.png")
    np.testing.assert_array_equal(src.labels, [0] * 20 + [1] * 20)
    head, labels = src.examples(range(3))
    np.testing.assert_array_equal(head, arrays["train"][[0, 2, 4]])  # PNG: exact pixels
    assert sources.default_splits("folder", str(tmp_path)) == ("train", "test")


@pytest.mark.parametrize("held_out", ["val", "valid", "validation"])
def test_a_val_folder_beside_train_is_the_eval_split_and_its_shards_too(tmp_path, held_out):
    """ImageNet's train/ + val/ (fastai's valid/, TFDS' validation/): the held-out folder is
    evaluated, not ignored while train/ is sliced 90/10; prepare's shards keep its name,
    and training on them evaluates on it by default too."""
    arrays = png_tree(str(tmp_path / "imgs"), splits=(("train", 12), (held_out, 4)))
    assert sources.default_splits("folder", str(tmp_path / "imgs")) == ("train", held_out)
    held = data.open_split(held_out, "folder", str(tmp_path / "imgs")).source
    assert held.num_examples == 4 and all(f"{os.sep}{held_out}{os.sep}" in p for p in held.paths)
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "out"), shards=1)
    assert sources.default_splits("tfrecord", str(tmp_path / "out")) == ("train", held_out)
    records = data.open_split(held_out, "tfrecord", str(tmp_path / "out")).source
    assert records.num_examples == 4
    with pytest.raises(DataError, match=rf"has no test-\* TFRecord shards \(it has shards of "
                                        rf"train, {held_out}\): name one of those in "
                                        r"--train_split or --eval_split"):
        data.open_split("test", "tfrecord", str(tmp_path / "out"))
    png_tree(str(tmp_path / "imgs"), splits=(("test", 4),))  # test/ first, when present
    assert sources.default_splits("folder", str(tmp_path / "imgs")) == ("train", "test")
    np.testing.assert_array_equal(held.examples(range(4))[0], arrays[held_out][[0, 2, 1, 3]])


def test_an_eval_split_that_overlaps_the_training_split_is_warned_of(tmp_path, caplog):
    """Evaluating on examples the model trains on (`test[:5000]`, `test[4000:]`; a folder's
    `train` and `train[90%:]`) gave metrics that looked held-out, without a word."""
    for i, a in enumerate(colour_images(20)):
        save(str(tmp_path / "flat" / f"img{i:02d}.png"), a)
    folder = {spec: data.open_split(spec, "folder", str(tmp_path / "flat")).source
              for spec in ("train", "train[:90%]", "train[90%:]", "train[85%:]")}
    for train, held, shared in (("train", "train[90%:]", 2), ("train[:90%]", "train[90%:]", 0),
                                ("train[:90%]", "train[85%:]", 1)):
        assert data.shared_examples("folder", None, train, held, folder[train],
                                    folder[held]) == shared
        # An evaluation opens no training split: its files are listed, not opened.
        assert data.shared_examples("folder", str(tmp_path / "flat"), train, held, None,
                                    folder[held]) == shared
    for train, held, shared in (("test[:5000]", "test[4000:]", 1000), ("test[:50%]", "test[50%:]", 0),
                                ("test[-100:]", "test", 100), ("train", "test", 0)):
        assert data.shared_examples("mnist", None, train, held, None, None) == shared
    os.makedirs(tmp_path / "shards")
    _write_records(tmp_path / "shards" / "train.tfrecord",
                   [{"image": tf.io.encode_png(a).numpy()} for a in colour_images(3)])
    records = data.open_split("train", "tfrecord", str(tmp_path / "shards")).source
    assert data.shared_examples("tfrecord", None, "train", "train", records, records) == 3
    for held, warned in (("test[20:60]", ["shares 20 of its 40 examples with --train_split="
                                          "test[:40]: its metrics are partly of images"]),
                         ("test[40:60]", [])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="absl"):
            core.run(Config(dataset="synthetic", train_split="test[:40]", eval_split=held,
                            train_steps=1, batch_size=8,
                            model_dir=str(tmp_path / f"run{len(warned)}")))
        assert [m[m.index("shares"):m.index(" the model")] for m in
                (r.getMessage() for r in caplog.records) if "--eval_split=" in m] == warned
    # --mode=eval on the run's own data, with the run's training split from its config.json.
    for held, warned in (("test[30:50]", ["shares 10 of its 20 examples with the run's "
                                          "--train_split=test[:40]: its metrics are partly of "
                                          "images"]),
                         ("test[40:60]", []), ("train[:20]", [])):
        caplog.clear()
        with caplog.at_level("WARNING", logger="absl"):
            core.run(Config(mode="eval", eval_split=held, model_dir=str(tmp_path / "run1")),
                     given={"mode", "eval_split", "model_dir"})
        assert [m[m.index("shares"):m.index(" the model")] for m in
                (r.getMessage() for r in caplog.records) if "--eval_split=" in m] == warned


def test_folders_that_look_like_splits_but_are_not_read_as_splits_are_named(tmp_path, caplog):
    """Kaggle's Training/ and Testing/ are read as two classes of one split (no train/):
    the log says so, and how to name them. Beside train/, a Test/ is not read: said too."""
    png_tree(str(tmp_path / "a"), splits=(("Training", 4), ("Testing", 2)), classes=("x",))
    with caplog.at_level("WARNING", logger="absl"):
        assert sources.default_splits("folder", str(tmp_path / "a")) == ("train[:90%]",
                                                                          "train[90%:]")
    assert any("has no train/ subfolder, so Testing/, Training/ are read as classes of one "
               "split, train" in r.getMessage() for r in caplog.records)
    png_tree(str(tmp_path / "b"), splits=(("train", 4), ("Test", 2)), classes=("x",))
    caplog.clear()
    with caplog.at_level("WARNING", logger="absl"):
        assert sources.default_splits("folder", str(tmp_path / "b")) == ("train[:90%]",
                                                                          "train[90%:]")
    assert any("Test/ not read (the splits beside train/ are test/, validation/, val/, valid/)"
               in r.getMessage() for r in caplog.records)
    png_tree(str(tmp_path / "c"), splits=(("train", 4), ("val", 2)), classes=("x",))
    caplog.clear()
    with caplog.at_level("WARNING", logger="absl"):
        sources.default_splits("folder", str(tmp_path / "c"))
    assert not caplog.records


def test_hidden_files_and_folders_are_not_read(tmp_path):
    """macOS's ._ resource forks beside copied photos are not images; a notebook's
    .ipynb_checkpoints/ holds copies of them. Neither is read, nor fails the check."""
    png_tree(str(tmp_path), splits=(("train", 4),), classes=("cat",))
    (tmp_path / "train" / "cat" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    save(str(tmp_path / "train" / "cat" / ".ipynb_checkpoints" / "000-checkpoint.png"),
         colour_images(1)[0])
    paths, others, runs, repeats = sources.list_images(str(tmp_path / "train"))
    assert [os.path.basename(p) for p in paths] == ["000.png", "001.png", "002.png", "003.png"]
    assert others == {"hidden": 2} and runs == [] and repeats == []
    assert data.open_split("train", "folder", str(tmp_path)).source.num_examples == 4


def test_jpegs_named_jfif_or_jpe_and_upper_case_extensions_are_read(tmp_path):
    """Windows saves a photo from a browser as .jfif: a JPEG, which was counted as a file
    of another type and not read."""
    for name in ("a.jfif", "b.jpe", "c.JPG", "d.Jpeg"):
        Image.fromarray(colour_images(1)[0]).save(tmp_path / name, "JPEG")
    (tmp_path / "e.tif").write_bytes(b"II*\x00")
    paths, others, _, _ = sources.list_images(str(tmp_path))
    assert [os.path.basename(p) for p in paths] == ["a.jfif", "b.jpe", "c.JPG", "d.Jpeg"]
    assert others == {".tif": 1}
    opened = data.open_split("train", "folder", str(tmp_path))
    assert opened.source.num_examples == 4


def test_linked_folders_are_read_once(tmp_path, caplog):
    """A class folder linked from elsewhere is read; a link back to the data folder (or to
    a folder read already) is not followed again: the walk followed it 40 levels deep, and
    every image was read 40 times, in both slices of train[:90%] / train[90%:]."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "disk2" / "dogs"
    for i, a in enumerate(colour_images(6)):
        save(str((photos / "cat" if i % 2 else elsewhere) / f"{i:02d}.png"), a)
    os.symlink(elsewhere, photos / "dog")
    os.symlink(photos, photos / "cat" / "back")  # a loop
    os.symlink(photos / "cat", photos / "cat_again")
    paths, _, _, repeats = sources.list_images(str(photos))
    assert sorted(os.path.relpath(p, photos) for p in paths) == [
        "cat/01.png", "cat/03.png", "cat/05.png", "dog/00.png", "dog/02.png", "dog/04.png"]
    assert sorted(os.path.relpath(p, photos) for p in repeats) == ["cat/back", "cat_again"]
    with caplog.at_level("WARNING", logger="absl"):
        split = data.open_split("train", "folder", str(photos))
    assert split.source.num_examples == 6
    assert f"{photos}: not following the links {photos}/cat/back, {photos}/cat_again: their " \
           f"folders ({photos}, {photos}/cat) are read once, by their own path or an earlier " \
           "link, and following them would repeat their images" in caplog.text


def test_a_file_name_that_is_not_utf8_is_named_in_one_line(tmp_path):
    """TensorFlow lists a folder by UTF-8 names only: a Latin-1 name (café.png copied from
    an old archive) raised UnicodeDecodeError from its listing, a traceback."""
    photos = tmp_path / "photos"
    for i, a in enumerate(colour_images(6)):
        save(str(photos / "cats" / f"{i}.png"), a)
    os.rename(photos / "cats" / "3.png", os.path.join(os.fsencode(photos / "cats"), b"caf\xe9.png"))
    message = (rf"^--data_dir={photos}: {photos}/cats/caf\\xe9.png has a name not in UTF-8, "
               r"and TensorFlow lists folders by UTF-8 names only: rename it \(for a tree of "
               rf"Latin-1 names: convmv -f latin1 -t utf8 -r --notest {photos}\)$")
    with pytest.raises(DataError, match=message):
        data.open_split("train", "folder", str(photos))
    config = Config(dataset="folder", data_dir=str(photos), model_dir=str(tmp_path / "run"),
                    epochs=None, train_steps=2, batch_size=2)
    with pytest.raises(DataError, match=message):
        core.run(config)
    assert not (tmp_path / "run").exists()
    # Beside the class folders, where the splits are looked for.
    os.rename(os.path.join(os.fsencode(photos / "cats"), b"caf\xe9.png"),
              os.path.join(os.fsencode(photos), b"caf\xe9"))
    with pytest.raises(DataError, match=message.replace("/cats", "").replace(".png", "")):
        sources.default_splits("folder", str(photos))


def test_a_model_dir_inside_the_data_folder_is_not_read(tmp_path, caplog):
    """--model_dir=photos/run with --data_dir=photos: from the second run on, the run's
    figures were training images of a class 'run', and the data changed under the resume."""
    photos = tmp_path / "photos"
    for i, a in enumerate(colour_images(20)):
        save(str(photos / ("cat" if i % 2 else "dog") / f"{i:02d}.png"), a)
    config = Config(dataset="folder", data_dir=str(photos), model_dir=str(photos / "run"),
                    epochs=None, train_steps=2, batch_size=6, eval_every=2)
    core.run(config)
    assert (photos / "run" / "reconstructions.png").exists()  # PNGs a folder read would take
    split = data.open_split("train[:90%]", "folder", str(photos))
    assert split.source.num_examples == 18 and split.source.class_names == ["cat", "dog"]
    assert f"not reading 1 training run folder inside it ({photos / 'run'})" in caplog.text
    assert core.run(config.replace(train_steps=4))["step"] == 4  # the resume: same data


def test_a_flat_folder_is_train_sliced_90_10(tmp_path):
    for i, a in enumerate(colour_images(20)):
        save(str(tmp_path / f"img{i:02d}.jpg"), a)
    assert sources.default_splits("folder", str(tmp_path)) == ("train[:90%]", "train[90%:]")
    train = data.open_split("train[:90%]", "folder", str(tmp_path)).source
    held = data.open_split("train[90%:]", "folder", str(tmp_path)).source
    assert (train.num_examples, held.num_examples) == (18, 2)
    assert not set(train.paths) & set(held.paths)
    assert train.labels is None  # unlabelled: fine
    with pytest.raises(ConfigError, match=r"has the splits train \(.*\): give one of them, e.g. "
                                          r"--eval_split=train\[90%:\] and "
                                          r"--train_split=train\[:90%\]$"):
        data.open_split("test", "folder", str(tmp_path))
    one = tmp_path / "one"
    save(str(one / "a.png"), colour_images(1)[0])
    with pytest.raises(ConfigError, match=r"train\[90%:\]' of .* is empty \(train has 1 image\): "
                       "widen the slice, or add images"):
        data.open_split("train[90%:]", "folder", str(one))


def test_a_slice_of_class_folders_holds_every_class(tmp_path):
    """Sliced in path order, train[90%:] of cat/ and dog/ would be dog/'s last files only:
    evaluation on one class. Slices follow a hash of each path instead; inside a slice the
    files stay in path order, and the two slices split the folder exactly."""
    root = tmp_path / "a"
    png_tree(str(root), splits=(("", 40),), classes=("cat", "dog", "owl", "yak"))
    train = data.open_split("train[:80%]", "folder", str(root)).source
    held = data.open_split("train[80%:]", "folder", str(root)).source
    assert (train.num_examples, held.num_examples) == (32, 8)
    assert sorted(train.paths + held.paths) == sorted(data.open_split(
        "train", "folder", str(root)).source.paths)
    assert held.paths == sorted(held.paths)
    assert sorted(set(held.labels.tolist())) == [0, 1, 2, 3]  # by path: [3] * 8
    assert [held.class_names[k] for k in held.labels] == [p.split(os.sep)[-2] for p in held.paths]
    # The same membership wherever the folder is (only paths inside it are hashed).
    shutil.copytree(root, tmp_path / "b")
    moved = data.open_split("train[80%:]", "folder", str(tmp_path / "b")).source
    assert [os.path.relpath(p, tmp_path / "b") for p in moved.paths] == [
        os.path.relpath(p, root) for p in held.paths]


def _rle8_bmp(rows):
    """An 8-bit BMP compressed by RLE (BI_RLE8, Windows' own), rows of palette indices."""
    import struct

    height, width = len(rows), len(rows[0])
    data = b"".join(b"".join(bytes([1, i]) for i in row) + b"\0\0" for row in reversed(rows))
    data += b"\0\1"
    palette = b"".join(bytes([b, g, r, 0]) for r, g, b in ((255, 0, 0), (0, 0, 255))) + bytes(
        4 * 254)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return (b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + palette
            + data)


def test_bmp_layouts_tensorflow_misreads_are_named_up_front(tmp_path):
    """TensorFlow's BMP decoder reads 24- and 32-bit pixels, and 8-bit ones as grey levels,
    ignoring the palette and any compression: a colour palette trained as its indices'
    greys, RLE as noise, a 1-bit BMP failed mid-run. Those are bad files up front now;
    the layouts it reads decode as Pillow shows them."""
    a = colour_images(1, 20, 30)[0]
    im = Image.fromarray(a)
    for name, image in (("rgb", im), ("rgba", im.convert("RGBA")), ("grey", im.convert("L"))):
        path = str(tmp_path / f"{name}.bmp")
        image.save(path)
        info = images.check_file(path)
        with open(path, "rb") as f:
            out = images.decode(tf.constant(f.read()), (20, 30), info.channels).numpy()
        shown = np.asarray(Image.open(path).convert("L" if info.channels == 1 else "RGB"))
        np.testing.assert_array_equal(out.reshape(shown.shape), shown)
    im.convert("P").save(tmp_path / "palette.bmp")
    im.convert("1").save(tmp_path / "one-bit.bmp")
    (tmp_path / "rle.bmp").write_bytes(_rle8_bmp([[0, 1, 1], [1, 0, 0]]))
    assert np.asarray(Image.open(tmp_path / "rle.bmp").convert("RGB"))[0, 0].tolist() == [255, 0, 0]
    for name, message in (
            ("palette", "a BMP of 8-bit colour-palette pixels (TensorFlow's decoder reads them "
                        "as grey levels; saved as PNG it reads right)"),
            ("one-bit", "a BMP of 1-bit pixels (TensorFlow's decoder cannot read them; saved as "
                        "PNG it reads right)"),
            ("rle", "an RLE-compressed BMP of 8-bit pixels (TensorFlow's decoder cannot read "
                    "them; saved as PNG it reads right)")):
        with pytest.raises(images.BadImage) as raised:
            images.check_file(str(tmp_path / f"{name}.bmp"))
        assert str(raised.value) == message


def test_images_past_pillows_decompression_bomb_limit_are_checked(tmp_path):
    """A 200-Mpx scan or panorama (1-bit here, 25 MB to write) was Pillow's
    DecompressionBombError traceback in the up-front check, and one of 100 Mpx its warning;
    Pillow's limit, a global, is the user's again afterwards."""
    import warnings

    limit = Image.MAX_IMAGE_PIXELS
    for width, height in ((20000, 10000), (10000, 10000)):
        path = str(tmp_path / f"{width}.png")
        Image.new("1", (width, height)).save(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info = images.check_file(path)
        assert (info.width, info.height, info.format) == (width, height, "PNG")
        assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert Image.MAX_IMAGE_PIXELS == limit is not None  # Pillow's own again


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "P"),
                                      ("PNG", "L"), ("JPEG", "RGB"), ("JPEG", "L"),
                                      ("JPEG", "CMYK"), ("WEBP", "RGB"), ("WEBP", "RGBA"),
                                      ("BMP", "RGB"), ("GIF", "P")])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_format_and_mode_decodes_to_the_requested_channels(tmp_path, fmt, mode, channels):
    a = colour_images(1, 30, 40)[0]
    raw = save(str(tmp_path / f"x.{fmt.lower()}"), a, fmt, mode)
    info = images.check_file(str(tmp_path / f"x.{fmt.lower()}"))
    assert (info.height, info.width, info.format) == (30, 40, fmt)
    out = images.decode(tf.constant(raw), (30, 40), channels).numpy()
    assert out.shape == (30, 40, channels) and out.dtype == np.uint8
    if channels == 3 and fmt in ("PNG", "WEBP", "BMP") and mode == "RGB":
        np.testing.assert_array_equal(out, a)  # lossless and unresized: the same pixels
    if mode == "RGB" and fmt != "JPEG":  # colour survives: not greyscale in disguise
        assert channels == 1 or np.abs(out[..., 0].astype(int) - out[..., 2]).max() > 10


def test_an_animated_gif_decodes_to_its_first_frame(tmp_path):
    """As in Keras (expand_animations=False); the up-front check lets it through."""
    frames = [Image.fromarray(a).convert("P") for a in colour_images(3, 30, 40)]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as im:
        first = np.array(im.convert("RGB"))
        im.seek(2)
        last = np.array(im.convert("RGB"))
    assert images.check_file(path).format == "GIF"
    with open(path, "rb") as f:
        out = images.decode(tf.constant(f.read()), (30, 40), 3).numpy()
    np.testing.assert_array_equal(out, first)
    assert np.abs(out.astype(int) - last).max() > 100


def test_resize_modes_crop_pad_stretch():
    # 40x80: red left and right quarters, blue middle half.
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :20, 0] = a[:, 60:, 0] = 255
    a[:, 20:60, 2] = 255
    crop = images.fit(tf.constant(a), (16, 16), "crop").numpy()
    assert crop[..., 2].min() > 200 and crop[..., 0].max() < 60  # the centre square: blue
    pad = images.fit(tf.constant(a), (16, 16), "pad").numpy()
    assert pad[:3].max() == 0 and pad[-3:].max() == 0  # black bars above and below
    assert pad[8, 1, 0] > 200 and pad[8, 8, 2] > 200  # the whole image, squeezed in
    # A thin strip (a 1x1000 banner) keeps one row; its scaled side was 0 px, an error
    # (`output dimensions must be positive`) that named the file as bad.
    for strip, axis in ((np.full((1, 1000, 3), 200, np.uint8), 1),
                        (np.full((1000, 1, 3), 200, np.uint8), 0)):
        out = images.fit(tf.constant(strip), (32, 32), "pad").numpy()
        assert out.shape == (32, 32, 3)
        assert list(np.nonzero(out.max(axis=(axis, 2)))[0]) == [15]  # one line, centred
        assert out.max() == 200
    stretch = images.fit(tf.constant(a), (16, 16), "stretch").numpy()
    assert stretch[:, 0, 0].min() > 200 and stretch[:, 8, 2].min() > 200  # edges stay red
    same = images.fit(tf.constant(a), (40, 80), "crop").numpy()
    np.testing.assert_array_equal(same, a)  # the right size: untouched
    up = images.fit(tf.constant(a[:10, :10]), (20, 20), "crop").numpy()
    assert up.shape == (20, 20, 3)


def test_a_folder_of_several_sizes_says_which_it_fits_them_to(tmp_path, caplog):
    from absl import logging as absl_logging

    save(str(tmp_path / "a.png"), colour_images(1, 30, 40)[0])
    save(str(tmp_path / "b.png"), colour_images(1, 20, 20)[0])
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)
    try:
        with caplog.at_level("INFO", logger="absl"):
            data.open_split("train", "folder", str(tmp_path))
            data.open_split("train", "folder", str(tmp_path), image_size=(16, 16))
    finally:
        absl_logging.set_verbosity(verbosity)
    hints = [r.getMessage() for r in caplog.records if "sizes" in r.getMessage()]
    assert hints == ["train: images of 2 sizes, all fitted to the first one's, 30x40 "
                     "(--image_size=H,W chooses another)"]  # not when the size is given


def test_photos_larger_than_512_px_need_an_image_size_to_train(tmp_path):
    """A folder of camera photos without --image_size trained at 4000x3000: hundreds of
    times the compute of the models' sizes, then an out-of-memory error naming the batch."""
    for i in range(10):  # 9 to train on, 1 held out
        save(str(tmp_path / "photos" / f"{i}.png"), colour_images(1, 600, 800, seed=i)[0])
    config = Config(dataset="folder", data_dir=str(tmp_path / "photos"), epochs=None,
                    model_dir=str(tmp_path / "run"), train_steps=1, batch_size=2, eval_every=1)
    with pytest.raises(ConfigError, match=r"^--dataset=folder: the first image is 600x800 and "
                       r"no --image_size was given; .* 117x the compute of 64x64 per image: give "
                       r"the size to train at, e.g. --image_size=192,256 \(the same aspect\) or "
                       r"--image_size=128, or --image_size=600,800 for full size$"):
        core.run(config)
    assert not (tmp_path / "run").exists()
    assert core.run(config.replace(image_size=(600, 800)))["step"] == 1  # asked for: trains
    # Its resume without the flag keeps the run's size (config.json has it), as before.
    assert core.run(config.replace(train_steps=2))["step"] == 2
    assert data.open_split("train", "folder", str(tmp_path / "photos")).source.image_shape == (
        600, 800, 3)  # the default itself is unchanged: the first image's size


def test_a_colour_folder_is_colour_whatever_its_first_file(tmp_path):
    save(str(tmp_path / "mixed" / "a.png"), colour_images(1)[0], mode="L")  # first: grey
    save(str(tmp_path / "mixed" / "b.png"), colour_images(1, seed=1)[0])
    assert data.open_split("train", "folder", str(tmp_path / "mixed")).source.image_shape[2] == 3
    save(str(tmp_path / "grey" / "a.png"), colour_images(1)[0], mode="L")
    save(str(tmp_path / "grey" / "b.jpg"), colour_images(1, seed=1)[0], mode="L")
    assert data.open_split("train", "folder", str(tmp_path / "grey")).source.image_shape[2] == 1


def test_folder_images_are_resized_and_smaller_ones_counted(tmp_path):
    save(str(tmp_path / "a" / "big.png"), colour_images(1, 60, 90)[0])
    save(str(tmp_path / "a" / "small.png"), colour_images(1, 10, 12)[0])
    opened = data.open_split("train", "folder", str(tmp_path), image_size=(32, 32), channels=1)
    assert opened.source.image_shape == (32, 32, 1) and opened.upscaled == 1
    head, _ = opened.source.examples(range(2))
    assert head.shape == (2, 32, 32, 1)


def test_files_that_decode_to_the_size_skip_the_resize(tmp_path):
    """Every JPEG 4x the output (or every PNG at it): decoded straight to the size, the
    same pixels as decoding and then fitting; one file of another size, or mixed formats,
    and every file is fitted again. A file that is not the size it was checked at fails."""
    arrays = colour_images(6, 96, 128)
    for i, a in enumerate(arrays):
        save(str(tmp_path / "jpg" / f"{i}.jpg"), a)
    src = data.open_split("train", "folder", str(tmp_path / "jpg"), image_size=(24, 32)).source
    assert src.decoding.exact and src.decoding.jpeg_ratio == 4
    assert src.decoding.describe() == "JPEGs decoded by libjpeg at 1/4 scale straight to 24x32, no resize"
    fitted = sources.Decoding((24, 32), 3, jpeg_ratio=4)  # decode at 1/4, then images.fit
    head, _ = src.examples(range(6))
    for i, got in enumerate(head):
        want = fitted(tf.io.read_file(str(tmp_path / "jpg" / f"{i}.jpg"))).numpy()
        np.testing.assert_array_equal(got, want)
    grey = data.open_split("train", "folder", str(tmp_path / "jpg"), image_size=(24, 32),
                           channels=1).source
    assert grey.decoding.exact and grey.examples(range(2))[0].shape == (2, 24, 32, 1)

    save(str(tmp_path / "jpg" / "odd.jpg"), colour_images(1, 100, 128)[0])  # 25x32 at 1/4
    src = data.open_split("train", "folder", str(tmp_path / "jpg"), image_size=(24, 32)).source
    assert not src.decoding.exact and src.decoding.jpeg_ratio == 4
    assert "then resized to 24x32 where they differ (--resize=crop)" in src.decoding.describe()
    assert src.examples(range(7))[0].shape == (7, 24, 32, 3)
    lying = sources.Decoding((24, 32), 3, jpeg_ratio=4, exact=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="25,32,3"):
        lying(tf.io.read_file(str(tmp_path / "jpg" / "odd.jpg")))

    png_tree(str(tmp_path / "png"), splits=(("train", 4),), classes=("only",))
    src = data.open_split("train", "folder", str(tmp_path / "png")).source
    assert src.decoding.exact and src.decoding.describe() == "decoded straight to 24x32, no resize"
    assert src.describe() == "4 image files (1 class)"
    save(str(tmp_path / "png" / "train" / "only" / "x.jpg"), colour_images(1)[0])
    src = data.open_split("train", "folder", str(tmp_path / "png")).source
    assert not src.decoding.exact  # a JPEG among the PNGs: decoded by the general path
    assert src.examples(range(5))[0].shape == (5, 24, 32, 3)


def test_webp_files_are_read_like_pngs(tmp_path):
    """.webp files in a folder: checked from their first bytes (Pillow opens a WebP only
    whole), lossless ones decoded to the same pixels, lossy ones as Pillow decodes them,
    and straight to the size among PNGs of it."""
    arrays = colour_images(3, 240, 320)
    arrays[0] = np.random.default_rng(1).integers(0, 256, (240, 320, 3))  # a large file
    for i, a in enumerate(arrays):
        save(str(tmp_path / "w" / f"{i}.webp"), a)  # lossless
    save(str(tmp_path / "w" / "3.png"), colour_images(1, 240, 320, seed=5)[0])
    lossy = tmp_path / "w" / "4.webp"
    Image.fromarray(colour_images(1, 240, 320, seed=6)[0]).save(lossy, "WEBP", quality=70)
    assert os.path.getsize(tmp_path / "w" / "0.webp") > 1 << 16  # past the check's first read
    info = images.check_file(str(tmp_path / "w" / "0.webp"))
    assert (info.height, info.width, info.channels, info.format) == (240, 320, 3, "WEBP")
    src = data.open_split("train", "folder", str(tmp_path / "w")).source
    assert src.num_examples == 5 and src.decoding.exact
    head = src.examples(range(5))[0]
    for i in range(3):
        np.testing.assert_array_equal(head[i], arrays[i])
    np.testing.assert_array_equal(head[3], colour_images(1, 240, 320, seed=5)[0])
    pillow = np.asarray(Image.open(lossy).convert("RGB")).astype(int)
    assert np.abs(head[4] - pillow).mean() < 1  # the same libwebp decode, within rounding


def _quadrants(h, w):
    """Four flat colours and a white corner: every flip and turn of it differs."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:h // 2, :w // 2], a[:h // 2, w // 2:] = (250, 0, 0), (0, 250, 0)
    a[h // 2:, :w // 2], a[h // 2:, w // 2:] = (0, 0, 250), (250, 250, 0)
    a[:h // 6, :w // 4] = 255
    return a


def _with_orientation(path, array, orientation):
    from PIL import Image

    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    tf.io.gfile.makedirs(os.path.dirname(path))
    Image.fromarray(array).save(path, quality=95, subsampling=0, exif=exif)


def test_jpegs_are_turned_upright_by_their_exif_orientation(tmp_path):
    """All eight EXIF orientations, as Pillow's exif_transpose shows them (what viewers
    show); on the straight path (every file the size) and through the resize with
    libjpeg's scaled decode; a folder without any keeps its decode free of the step."""
    from PIL import Image, ImageOps

    stored = _quadrants(48, 32)
    for o in range(1, 9):  # 1-4 display 48x32, 5-8 are turned: 32x48
        _with_orientation(str(tmp_path / ("tall" if o <= 4 else "wide") / f"{o}.jpg"), stored, o)
    for folder, orientations in (("tall", range(1, 5)), ("wide", range(5, 9))):
        src = data.open_split("train", "folder", str(tmp_path / folder)).source
        assert src.decoding.exact and list(src.orientations) == list(orientations)
        for got, o in zip(src.examples(range(4))[0], orientations):
            path = str(tmp_path / folder / f"{o}.jpg")
            info = images.check_file(path)
            assert info.orientation == o and (info.height, info.width) == got.shape[:2]
            want = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
            assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 1.5, o

    # Among JPEGs of other scales (so each file's scale is chosen as it is decoded): a
    # turned one is scaled by its displayed sides. Stored 96x48 and shown 48x96, cropped
    # to 48x24, it needs all its pixels; judged by its stored sides it would be decoded
    # at 1/2 and blown up again.
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.integers(0, 256, (12, 6, 3)), np.ones((8, 8, 1))).astype(np.uint8)
    _with_orientation(str(tmp_path / "mixed" / "a.jpg"), blocks, 6)  # stored 96x48
    save(str(tmp_path / "mixed" / "b.jpg"), _quadrants(192, 96))  # 1/4 scale for 48x24
    src = data.open_split("train", "folder", str(tmp_path / "mixed"), image_size=(48, 24)).source
    assert src.decoding.jpeg_ratio is None and list(src.orientations) == [6, 1]
    turned, plain = src.examples(range(2))[0].astype(int)
    upright = np.rot90(blocks, k=-1)  # 90 degrees clockwise, as orientation 6 asks
    want = images.fit(tf.constant(np.ascontiguousarray(upright)), (48, 24)).numpy()
    assert np.abs(turned - want).mean() < 4, np.abs(turned - want).mean()
    assert np.abs(plain - images.fit(tf.constant(_quadrants(192, 96)), (48, 24)).numpy()).mean() < 4

    png_tree(str(tmp_path / "png"), splits=(("train", 2),), classes=("only",))
    assert data.open_split("train", "folder", str(tmp_path / "png")).source.orientations is None


def test_folder_pipeline_is_the_in_memory_pipeline_batch_for_batch(tmp_path):
    """Order = f(seed, epoch) for files too: the same batches as the same images held in
    memory, from the start and resumed mid-epoch, and under 2 pipelines of 2 replicas."""
    arrays = png_tree(str(tmp_path), splits=(("train", 40),), classes=("only",))
    src = data.open_split("train", "folder", str(tmp_path)).source
    memory = data.materialize(src)
    np.testing.assert_array_equal(memory.images, arrays["train"])
    for start in (0, 7):
        a = _first_batches(data.train_dataset(src, 8, seed=3, start_step=start), 9)
        b = _first_batches(data.train_dataset(memory.images, 8, seed=3, start_step=start), 9)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                     num_replicas_in_sync=4)
    a = _first_batches(data.train_dataset(src, 8, 3, 0, ctx), 4)
    b = _first_batches(data.train_dataset(memory.images, 8, 3, 0, ctx), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
        assert x.shape == (2, 24, 32, 3)


def test_files_decode_in_chunks_of_a_replica_batch_with_the_same_batches(tmp_path):
    """Several files per map call (data.DECODE_CHUNK): chunks divide a replica's batch
    (so a failing file is in the step that read it), and the batches are those of one
    file per call (--bad_images=skip's path) and of the same images in memory."""
    assert [data.decode_chunk_size(n) for n in (256, 36, 18, 17, 8)] == [16, 12, 9, 1, 8]
    png_tree(str(tmp_path / "imgs"), splits=(("train", 40), ("test", 13)))
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "shards"), shards=3)
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "raw"), shards=2, encoding="raw")
    cases = (("folder", "imgs", None), ("folder", "imgs", (16, 20)),  # straight, resized
             ("tfrecord", "shards", None), ("tfrecord", "raw", (16, 20)))  # PNG, raw resized
    for kind, where, size in cases:
        src = data.open_split("train", kind, str(tmp_path / where), image_size=size).source
        memory = data.materialize(src).images
        for batch in (36, 18, 17):  # chunks of 12 (3 a batch), 9 (2) and 1
            chunked = _first_batches(data.train_dataset(src, batch, seed=5), 3)
            single = _first_batches(data.train_dataset(src, batch, seed=5, skip_bad=True), 3)
            for x, y in zip(chunked, single):
                np.testing.assert_array_equal(x, y)
                assert x.shape == (batch, *(size or (24, 32)), 3)
            if kind == "folder":
                in_memory = _first_batches(data.train_dataset(memory, batch, seed=5), 3)
                for x, y in zip(chunked, in_memory):
                    np.testing.assert_array_equal(x, y)
        test = data.open_split("test", kind, str(tmp_path / where), image_size=size).source
        for batch in (9, 6):  # 13 examples: chunks of 9 and 6, the last batch padded
            chunked = [t.numpy() for _, t, _ in data.eval_dataset(test, batch)]
            single = [t.numpy() for _, t, _ in data.eval_dataset(test, batch, skip_bad=True)]
            np.testing.assert_array_equal(np.concatenate(chunked), np.concatenate(single))


@pytest.mark.parametrize("kind", ["folder", "tfrecord"])
def test_eval_sees_every_example_once_with_padding_and_noise(tmp_path, kind):
    arrays = png_tree(str(tmp_path / "imgs"), splits=(("train", 8), ("test", 13)))
    if kind == "tfrecord":
        prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "shards"), shards=3)
    src = data.open_split("test", kind, str(tmp_path / ("imgs" if kind == "folder" else "shards")))
    src = src.source
    # Folder order is sorted paths (cat/ then dog/); prepare keeps that order.
    expected = data.materialize(src).images
    assert sorted(map(bytes, expected)) == sorted(map(bytes, arrays["test"]))
    for ctx, batch in ((None, 4), (tf.distribute.InputContext(2, 0, 2), 4),
                       (tf.distribute.InputContext(2, 1, 2), 4)):
        seen, weights = [], []
        for inputs, targets, w in data.eval_dataset(src, batch, ctx, noise_factor=0.3, seed=2):
            seen.append(np.rint(targets.numpy() * 255).astype(np.uint8))
            weights.append(w.numpy())
            assert not np.allclose(inputs.numpy(), targets.numpy())
        seen, weights = np.concatenate(seen), np.concatenate(weights)
        real = seen[weights > 0]
        if ctx is None:
            np.testing.assert_array_equal(real, expected)
            assert weights.sum() == 13 and len(weights) == 16
        else:  # pipeline i holds replica i's slice of every global batch
            rows = np.arange(16).reshape(4, 2, 2)[:, ctx.input_pipeline_id].ravel()
            np.testing.assert_array_equal(real, expected[rows[rows < 13]])
    noisy = data.noisy_copy(expected[:4], 0.3, 2)
    first = next(iter(data.eval_dataset(src, 4, None, noise_factor=0.3, seed=2)))[0].numpy()
    np.testing.assert_allclose(first, noisy, atol=1e-6)  # figures show what eval scored


# ---------------------------------------------------------------- tfrecord
def prepare_shards(data_dir, output_dir, shards=2, **kw):
    return prepare.convert("folder", output_dir, data_dir, shards=shards, progress=None, **kw)


def test_the_figures_examples_are_spread_over_a_split_and_its_shards(tmp_path):
    """data.spread's positions run evenly from the first; a folder split (in path order:
    all of cat/, then dog/), its shards and its copy in memory give the same images and
    labels at them, both classes among them (the first few are cats only)."""
    assert list(data.spread(10, 4)) == [0, 2, 5, 7] and list(data.spread(3, 8)) == [0, 1, 2]
    png_tree(str(tmp_path / "imgs"))
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "out"), shards=3)
    folder = data.open_split("train", "folder", str(tmp_path / "imgs")).source
    shards = data.open_split("train", "tfrecord", str(tmp_path / "out")).source
    memory = data.materialize(folder)
    positions = data.spread(40, 6)
    assert list(positions) == [0, 6, 13, 20, 26, 33]
    for source in (folder, shards, memory):
        images, labels = source.examples(positions)
        np.testing.assert_array_equal(images, memory.images[positions])
        np.testing.assert_array_equal(labels, memory.labels[positions])
    assert list(memory.labels[positions]) == [0, 0, 0, 1, 1, 1]
    assert set(folder.examples(range(6))[1]) == {0}
    # A shard is read only up to its last wanted record: a damaged last record of the
    # first shard is not reached when its first record and the next shard's are wanted.
    first = tmp_path / "out" / "train-00000-of-00003"
    damaged = bytearray(first.read_bytes())
    damaged[-10] ^= 0xFF  # inside the last record's data: its CRC no longer matches
    first.write_bytes(bytes(damaged))
    with pytest.raises(tf.errors.DataLossError):
        list(shards.records())
    images, _ = shards.examples([0, shards.counts[0]])
    np.testing.assert_array_equal(images, memory.images[[0, shards.counts[0]]])


def test_prepare_writes_model_garden_examples_that_read_back_exactly(tmp_path):
    png_tree(str(tmp_path / "imgs"))
    info = prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "out"), shards=3)
    assert info["splits"]["train"]["examples"] == 40 and len(info["shards"]) == 6
    assert info["image_shape"] == [24, 32, 3] and info["class_names"] == ["cat", "dog"]
    files = sorted(os.listdir(tmp_path / "out"))
    assert files[:3] == ["dataset_info.json", "test-00000-of-00003", "test-00001-of-00003"]
    record = next(iter(tf.data.TFRecordDataset(str(tmp_path / "out" / "train-00000-of-00003"))))
    feature = tf.train.Example.FromString(record.numpy()).features.feature
    assert feature["image/format"].bytes_list.value == [b"png"]
    assert feature["image/height"].int64_list.value == [24]
    assert feature["image/width"].int64_list.value == [32]
    assert feature["image/class/label"].int64_list.value == [0]
    folder = data.open_split("train", "folder", str(tmp_path / "imgs")).source
    shards = data.open_split("train", "tfrecord", str(tmp_path / "out")).source
    assert shards.num_examples == 40 and shards.image_shape == (24, 32, 3)
    assert shards.decoding.exact  # dataset_info.json: PNGs at the size, no resize
    back = data.materialize(shards)
    np.testing.assert_array_equal(back.images, data.materialize(folder).images)
    np.testing.assert_array_equal(back.labels, folder.labels)
    assert back.class_names == ("cat", "dog")  # named in the latent-space figure
    smaller = data.open_split("train", "tfrecord", str(tmp_path / "out"), image_size=(12, 16))
    assert not smaller.source.decoding.exact and smaller.source.examples(range(2))[0].shape == (2, 12, 16, 3)
    # Without dataset_info.json the shards are counted; gzip is found by its magic bytes.
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "gz"), 2, gzip=True)
    os.remove(tmp_path / "gz" / "dataset_info.json")
    gz = data.open_split("train", "tfrecord", str(tmp_path / "gz")).source
    assert gz.compression == "GZIP" and gz.num_examples == 40 and not gz.decoding.exact
    np.testing.assert_array_equal(data.materialize(gz).images, back.images)
    # A pattern as --data_dir.
    pattern = data.open_split("test", "tfrecord", str(tmp_path / "out" / "*-of-*")).source
    assert pattern.num_examples == 12


def test_raw_shards_read_back_as_the_png_ones_and_convert_like_them(tmp_path):
    """--encoding=raw: TF-slim's image/format "raw" (uint8 pixels), read without a decoder,
    resized and converted to the requested channels like the PNG shards of the same images."""
    png_tree(str(tmp_path / "imgs"))
    info = prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "raw"), shards=2,
                          encoding="raw")
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "png"), shards=2)
    assert info["encoding"] == "raw"
    record = next(iter(tf.data.TFRecordDataset(str(tmp_path / "raw" / "train-00000-of-00002"))))
    feature = tf.train.Example.FromString(record.numpy()).features.feature
    assert feature["image/format"].bytes_list.value == [b"raw"]
    assert len(feature["image/encoded"].bytes_list.value[0]) == 24 * 32 * 3
    for kw in ({}, {"image_size": (12, 20)}, {"image_size": (16, 16), "channels": 1}):
        raw = data.open_split("train", "tfrecord", str(tmp_path / "raw"), **kw).source
        png = data.open_split("train", "tfrecord", str(tmp_path / "png"), **kw).source
        assert raw.raw_channels == 3 and not png.raw_channels and "raw pixels" in raw.describe()
        assert raw.image_shape == png.image_shape
        assert raw.describe_decoding() == ("raw pixels at the output size, a batch at a time"
                                           if not kw else "raw pixels, resized to "
                                           f"{'x'.join(map(str, kw['image_size']))} where they differ")
        assert png.describe_decoding().endswith(
            "no resize" if not kw else "where they differ (--resize=crop)")
        a, b = data.materialize(raw), data.materialize(png)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    # Raw shards of the output's shape decode a batch at once, into the same batches.
    raw = data.open_split("train", "tfrecord", str(tmp_path / "raw")).source
    png = data.open_split("train", "tfrecord", str(tmp_path / "png")).source
    assert raw.batch_decodable and not png.batch_decodable
    assert not data.open_split("train", "tfrecord", str(tmp_path / "raw"),
                               image_size=(12, 20)).source.batch_decodable
    for x, y in zip(_first_batches(data.train_dataset(raw, 8, seed=3, start_step=2), 7),
                    _first_batches(data.train_dataset(png, 8, seed=3, start_step=2), 7)):
        np.testing.assert_array_equal(x, y)
    # Greyscale raw shards, asked for RGB: the grey value in every channel.
    grey = data.open_split("train", "tfrecord", str(tmp_path / "png"), channels=1).source
    (tmp_path / "grey").mkdir()
    prepare.write_split(grey, "train", str(tmp_path / "grey"), 1, gzip=False, encoding="raw")
    rgb = data.open_split("train", "tfrecord", str(tmp_path / "grey"), channels=3).source
    assert rgb.raw_channels == 1 and rgb.image_shape == (24, 32, 3)
    np.testing.assert_array_equal(data.materialize(rgb).images,
                                  np.repeat(data.materialize(grey).images, 3, axis=-1))
    # A first record whose byte count is not its height x width x channels is refused.
    bad = tmp_path / "bad"
    bad.mkdir()
    with tf.io.TFRecordWriter(str(bad / "train-00000-of-00001")) as w:
        w.write(prepare.example(b"\0" * 100, (24, 32, 3), 0, "raw").SerializeToString())
    with pytest.raises(DataError, match=r"train-00000-of-00001: its raw images need image/height,"
                                        r" image/width and image/channels whose product is the "
                                        r"100 bytes"):
        data.open_split("train", "tfrecord", str(bad))
    # A damaged record further in fails when read, like a damaged PNG, or is skipped.
    good = list(tf.data.TFRecordDataset(str(tmp_path / "raw" / "train-00000-of-00002")))
    with tf.io.TFRecordWriter(str(bad / "train-00000-of-00001")) as w:
        for i, r in enumerate(good[:8]):
            w.write(r.numpy() if i != 5 else prepare.example(
                b"\0" * 100, (24, 32, 3), 0, "raw").SerializeToString())
    src = data.open_split("train", "tfrecord", str(bad)).source
    with pytest.raises(tf.errors.InvalidArgumentError):
        _first_batches(data.train_dataset(src, 7, seed=0), 1)
    skipped = _first_batches(data.train_dataset(src, 7, seed=0, skip_bad=True), 2)
    assert all(b.shape == (7, 24, 32, 3) for b in skipped)
    # The same in shards whose dataset_info.json promises one shape (batches decoded at once).
    shard = tmp_path / "raw" / "train-00000-of-00002"
    records = list(tf.data.TFRecordDataset(str(shard)))
    with tf.io.TFRecordWriter(str(shard)) as w:
        for i, r in enumerate(records):
            w.write(r.numpy() if i != 5 else prepare.example(
                b"\0" * 100, (24, 32, 3), 0, "raw").SerializeToString())
    info_path = tmp_path / "raw" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    next(s for s in info["shards"] if s["file"] == shard.name)["bytes"] = shard.stat().st_size
    info_path.write_text(json.dumps(info))
    src = data.open_split("train", "tfrecord", str(tmp_path / "raw")).source
    assert src.batch_decodable
    with pytest.raises(tf.errors.InvalidArgumentError, match="does not hold 2304 bytes"):
        _first_batches(data.train_dataset(src, 40, seed=0), 1)
    assert len(_first_batches(data.train_dataset(src, 13, seed=0, skip_bad=True), 4)) == 4
    with pytest.raises(ConfigError, match="--encoding=jpeg: choose one of png, raw"):
        prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "x"), encoding="jpeg")
    with pytest.raises(ConfigError, match="--png_compression=12: 0"):
        prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "x"), png_compression=12)
    with pytest.raises(ConfigError, match=r"^--dataset='folder:.*imgs': the path goes in its "
                       r"own flag: --dataset=folder --data_dir=.*imgs$"):
        prepare.convert(f"folder:{tmp_path / 'imgs'}", str(tmp_path / "x"), progress=None)
    with pytest.raises(ConfigError, match=r"^--data_dir=.*imgs is not read by "
                       r"--dataset=fontdigits, which is built in: for your images add "
                       r"--dataset=folder"):  # it wrote the built-in digits
        prepare.convert("fontdigits", str(tmp_path / "x"), data_dir=str(tmp_path / "imgs"),
                        progress=None)
    assert not (tmp_path / "x").exists()  # refused before anything is written


def test_tfrecord_order_is_a_function_of_seed_and_epoch_and_resumes_exactly(tmp_path):
    png_tree(str(tmp_path / "imgs"), splits=(("train", 48), ("test", 4)), classes=("a",))
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "out"), shards=4)
    src = data.open_split("train", "tfrecord", str(tmp_path / "out")).source
    whole = _first_batches(data.train_dataset(src, 8, seed=5), 18)  # 3 epochs of 6
    again = _first_batches(data.train_dataset(src, 8, seed=5), 18)
    resumed = _first_batches(data.train_dataset(src, 8, seed=5, start_step=8), 10)
    for x, y in zip(whole, again):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(whole[8:], resumed):
        np.testing.assert_array_equal(x, y)

    def keys(batches):
        return [bytes(np.rint(im * 255).astype(np.uint8)) for b in batches for im in b]

    epochs = [keys(whole[i:i + 6]) for i in (0, 6, 12)]
    assert all(len(set(e)) == 48 for e in epochs)  # each epoch: every example once
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    other = keys(_first_batches(data.train_dataset(src, 8, seed=6), 6))
    assert other != epochs[0]
    # Two workers read disjoint shards.
    parts = [keys(_first_batches(data.train_dataset(
        src, 8, 5, 0, tf.distribute.InputContext(2, i, 2)), 6)) for i in (0, 1)]
    assert not set(parts[0]) & set(parts[1])


# -------------------------------------------------------------------- tfds
@pytest.fixture
def tfds_temp(tmp_path, monkeypatch):
    """Python's temp dir inside tmp_path: TFDS 4.9.10 makes an empty `tmpXXXXtfds` there for
    each builder of an unprepared dataset (`DatasetInfo.initialize_from_bucket`, before it
    finds GCS disabled) and never removes it; the tests' five stayed in /tmp for good."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return temp


def tfds_from_files(root, data_dir, splits=("train", "test"), name="local_pets"):
    """A real TFDS dataset, prepared by a TFDS builder from the PNG files under `root`."""
    import tensorflow_datasets as tfds

    def split(name):
        paths = sorted(str(p) for p in (root / name).rglob("*.png"))
        labels = [0 if "/cat/" in p else 1 for p in paths]
        return tf.data.Dataset.from_tensor_slices((paths, labels)).map(
            lambda p, y: {"image": tf.io.decode_png(tf.io.read_file(p), channels=3), "label": y})

    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(24, 32, 3)),
        "label": tfds.features.ClassLabel(names=["cat", "dog"])})
    builder = tfds.dataset_builders.TfDataBuilder(
        name=name, config="small", version="1.0.0", data_dir=str(data_dir),
        split_datasets={s: split(s) for s in splits}, features=features)
    builder.download_and_prepare()


def test_tfds_dataset_with_an_image_and_a_mask_trains_on_the_one_named(tmp_path, caplog, tfds_temp):
    """A TFDS dataset with two Image features (oxford_iiit_pet's image and
    segmentation_mask): `image` by default (it was "the first", which read back was the
    mask), with a log line naming the other and the flag; --image_feature picks the other;
    a name that is no Image feature is one line."""
    import tensorflow_datasets as tfds

    pixels = colour_images(6)
    masks = (pixels[..., :1] // 128) * 255
    tfds.dataset_builders.TfDataBuilder(
        name="local_seg", config="small", version="1.0.0", data_dir=str(tmp_path),
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(
            {"image": pixels, "segmentation_mask": masks, "label": np.arange(6) % 2})},
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(24, 32, 3)),
            "segmentation_mask": tfds.features.Image(shape=(24, 32, 1)),
            "label": tfds.features.ClassLabel(names=["cat", "dog"])})).download_and_prepare()
    with caplog.at_level("INFO", logger="absl"):
        first = data.open_split("train", "tfds:local_seg/small", str(tmp_path)).source
    assert any("tfds:local_seg/small: training on its Image feature 'image' (it also has "
               "segmentation_mask: --image_feature=NAME picks another)" in r.getMessage()
               for r in caplog.records)
    named = data.open_split("train", "tfds:local_seg/small", str(tmp_path),
                            image_feature="segmentation_mask").source
    assert (first.image_shape, named.image_shape) == ((24, 32, 3), (24, 32, 1))
    order = [bytes(a) for a in pixels]  # TFDS shuffled the examples once, when preparing them
    read = data.materialize(first)
    at = [order.index(bytes(a)) for a in read.images]
    np.testing.assert_array_equal(data.materialize(named).images, masks[at])
    np.testing.assert_array_equal(data.materialize(named).labels, read.labels)
    with pytest.raises(DataError, match=r"^--image_feature=label: tfds:local_seg/small has no "
                                        r"Image feature of that name \(its Image features: "
                                        r"image, segmentation_mask\)$"):
        data.open_split("train", "tfds:local_seg/small", str(tmp_path), image_feature="label")
    # Several, none named `image`: not guessed (a prepared dataset's feature order is not
    # the builder's: this one's read back lists segmentation_mask first).
    tfds.dataset_builders.TfDataBuilder(
        name="local_pair", config="small", version="1.0.0", data_dir=str(tmp_path),
        split_datasets={"train": tf.data.Dataset.from_tensor_slices(
            {"left": pixels, "right": pixels})},
        features=tfds.features.FeaturesDict({
            "left": tfds.features.Image(shape=(24, 32, 3)),
            "right": tfds.features.Image(shape=(24, 32, 3))})).download_and_prepare()
    with pytest.raises(DataError, match=r"^tfds:local_pair/small has several Image features "
                                        r"\(left, right\): name the one to train on, e.g. "
                                        r"--image_feature=left$"):
        data.open_split("train", "tfds:local_pair/small", str(tmp_path))
    assert data.open_split("train", "tfds:local_pair/small", str(tmp_path),
                           image_feature="right").source.image_shape == (24, 32, 3)


def test_tfds_dataset_from_local_files(tmp_path, tfds_temp):
    arrays = png_tree(str(tmp_path / "imgs"))
    tfds_from_files(tmp_path / "imgs", tmp_path / "tfds")
    folder = data.materialize(data.open_split("train", "folder", str(tmp_path / "imgs")).source)
    src = data.open_split("train", "tfds:local_pets/small", str(tmp_path / "tfds")).source
    assert src.num_examples == 40 and src.image_shape == (24, 32, 3)
    assert src.class_names == ["cat", "dog"]
    whole = data.materialize(src)  # TFDS shuffled the examples once, when preparing them
    label_of = {bytes(im): y for im, y in zip(folder.images, folder.labels)}
    assert {bytes(im): y for im, y in zip(whole.images, whole.labels)} == label_of
    first = data.open_split("train[:50%]", "tfds:local_pets/small", str(tmp_path / "tfds"))
    second = data.open_split("train[50%:]", "tfds:local_pets/small", str(tmp_path / "tfds"))
    halves = [data.materialize(h.source).images for h in (first, second)]
    np.testing.assert_array_equal(np.concatenate(halves), whole.images)  # TFDS slicing
    for train, held, shared in (("train[:50%]", "train[50%:]", 0), ("train", "train[-25%:]", 10)):
        assert data.shared_examples("tfds:local_pets/small", str(tmp_path / "tfds"), train, held,
                                    first.source, second.source) == shared
    assert len(arrays["train"]) == 40
    resumed = _first_batches(data.train_dataset(src, 8, seed=1, start_step=3), 4)
    whole_run = _first_batches(data.train_dataset(src, 8, seed=1), 7)
    for x, y in zip(whole_run[3:], resumed):
        np.testing.assert_array_equal(x, y)
    config = Config(dataset="tfds:local_pets/small", data_dir=str(tmp_path / "tfds"),
                    model_dir=str(tmp_path / "run"), epochs=None, train_steps=3, batch_size=8,
                    eval_every=3)
    assert core.run(config)["step"] == 3
    with pytest.raises(DataError, match="TFDS has no dataset 'no_such_set'"):
        data.open_split("train", "tfds:no_such_set", str(tmp_path / "tfds"))
    with pytest.raises(ConfigError, match="its splits: train, test"):
        data.open_split("validation", "tfds:local_pets/small", str(tmp_path / "tfds"))
    assert sources.default_splits("tfds:local_pets/small", str(tmp_path / "tfds")) == (
        "train", "test")


def test_tfds_default_eval_split_is_the_held_out_one_it_has(tmp_path, tfds_temp):
    """Imagenette has train and validation, tf_flowers only train: a run without
    --eval_split evaluates on validation, or on train[90%:], not on a missing test."""
    png_tree(str(tmp_path / "imgs"), splits=(("train", 20), ("validation", 4)))
    tfds_from_files(tmp_path / "imgs", tmp_path / "tfds", ("train", "validation"), "local_nette")
    tfds_from_files(tmp_path / "imgs", tmp_path / "tfds", ("train",), "local_flowers")
    assert sources.default_splits("tfds:local_nette/small", str(tmp_path / "tfds")) == (
        "train", "validation")
    assert sources.default_splits("tfds:local_flowers/small", str(tmp_path / "tfds")) == (
        "train[:90%]", "train[90%:]")
    run = core.run(Config(dataset="tfds:local_nette/small", data_dir=str(tmp_path / "tfds"),
                          model_dir=str(tmp_path / "run"), epochs=None, train_steps=2,
                          batch_size=4, eval_every=2))
    assert run["step"] == 2
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["train_split"], saved["eval_split"]) == ("train", "validation")
    info = prepare.convert("tfds:local_flowers/small", str(tmp_path / "shards"),
                           str(tmp_path / "tfds"), progress=None, shards=1)
    assert {k: v["examples"] for k, v in info["splits"].items()} == {"train": 18, "test": 2}
    # The labels travel along (they were written as -1: streamed records' labels are read
    # with them, not listed up front).
    tfds_train = data.open_split("train[:90%]", "tfds:local_flowers/small",
                                 str(tmp_path / "tfds")).source
    shards = data.open_split("train", "tfrecord", str(tmp_path / "shards")).source
    np.testing.assert_array_equal(shards.examples(range(18))[1], tfds_train.examples(range(18))[1])
    assert set(shards.examples(range(18))[1]) == {0, 1}


# ------------------------------------------------------------ bad input
def _bad_folder(tmp_path, name, content):
    folder = tmp_path / name
    save(str(folder / "good.png"), colour_images(1)[0])
    path = folder / "bad.png"
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return folder, path


def _png_bytes():
    buffer = io.BytesIO()
    Image.fromarray(colour_images(1)[0]).save(buffer, "PNG")
    return buffer.getvalue()


def _webp_bytes(animated=False, **options):
    frames = [Image.fromarray(a) for a in colour_images(2, 60, 80)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=animated, append_images=frames[1:] if animated else [],
                   **options)
    return buffer.getvalue()


def _jpeg_bytes(h=24, w=32):
    buffer = io.BytesIO()
    Image.fromarray(colour_images(1, h, w)[0]).save(buffer, "JPEG")
    return buffer.getvalue()


def _png_bomb_bytes(width=2_000_000, height=2_000_000):
    """A PNG whose header says 4 million Mpx (1-bit): a decompression bomb's, which a
    decoder would try to hold in memory. Its data is a few bytes: the check reads the header
    and the end."""
    import struct
    import zlib

    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case,content,match", [
    ("decompression_bomb", _png_bomb_bytes(), r"4,000,000 Mpx, which would need about "
                                              r"100,000 GB of memory to decode \("),
    ("zero_byte", b"", "empty"),
    ("not_an_image", b"hello, I am text\n" * 20, "not an image"),
    ("truncated_png", _png_bytes()[:300], "truncated PNG"),
    ("truncated_jpeg", _jpeg_bytes()[:400], "truncated"),
    ("truncated_jpeg_body", _jpeg_bytes(200, 200)[:-200], "truncated JPEG .it does not end"),
    ("dangling_link", lambda p: os.symlink("/nonexistent/file.png", p), "not readable"),
    ("truncated_webp", _webp_bytes(quality=90)[:-40], "truncated WebP"),
    ("animated_webp", _webp_bytes(animated=True), "animated WebP"),
])
def test_bad_files_are_named_up_front_or_skipped(tmp_path, case, content, match):
    folder, bad = _bad_folder(tmp_path, case, content)
    with pytest.raises(DataError, match=rf"{bad} is .*{match}.*--bad_images=skip"):
        data.open_split("train", "folder", str(folder))
    opened = data.open_split("train", "folder", str(folder), bad_images="skip")
    assert opened.source.num_examples == 1 and list(opened.skipped) == [str(bad)]


def test_an_unreadable_file_is_named(tmp_path):
    folder, bad = _bad_folder(tmp_path, "perm", _png_bytes())
    os.chmod(bad, 0)
    try:
        if os.access(bad, os.R_OK):  # root reads anything: a symlink loop no one can read
            os.chmod(bad, 0o644)
            bad.unlink()
            os.symlink(bad.name, bad)
        with pytest.raises(DataError, match=r"bad.png is not readable"):
            data.open_split("train", "folder", str(folder))
    finally:
        if bad.is_file():
            os.chmod(bad, 0o644)


def test_empty_and_imageless_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images .no files at all"):
        data.open_split("train", "folder", str(tmp_path / "empty"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    (tmp_path / "docs" / "b.tiff").write_bytes(b"II*\x00")
    with pytest.raises(DataError, match=r"only files ending \.tiff, \.txt.*tapeloop reads \.jpg"):
        data.open_split("train", "folder", str(tmp_path / "docs"))
    with pytest.raises(DataError, match="is not a folder: give the folder that holds your "
                                        "images$"):
        data.open_split("train", "folder", str(tmp_path / "missing"))
    (tmp_path / "photos.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    with pytest.raises(DataError, match=r"photos.zip is not a folder: give the folder that holds "
                                        r"your images \(extract the archive into one first\)$"):
        data.open_split("train", "folder", str(tmp_path / "photos.zip"))


def test_bad_shards(tmp_path):
    png_tree(str(tmp_path / "imgs"), splits=(("train", 20), ("test", 4)))
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "out"), shards=2)
    shard = tmp_path / "out" / "train-00001-of-00002"
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2 + 7])  # mid-record, whatever the record sizes
    with pytest.raises(DataError, match=r"train-00001-of-00002 has .* bytes, but dataset_info"):
        data.open_split("train", "tfrecord", str(tmp_path / "out"))
    os.remove(tmp_path / "out" / "dataset_info.json")  # counting finds it too
    with pytest.raises(DataError, match=r"train-00001-of-00002 ends inside .*the shard is truncated"):
        data.open_split("train", "tfrecord", str(tmp_path / "out"))
    other = tmp_path / "nokey"
    other.mkdir()
    with tf.io.TFRecordWriter(str(other / "train-00000-of-00001")) as w:
        w.write(tf.train.Example(features=tf.train.Features(feature={
            "image/raw": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"x"]))}))
            .SerializeToString())
    with pytest.raises(DataError, match=r"no image/encoded feature, nor another that holds an "
                                        r"encoded image \(they have image/raw\)"):
        data.open_split("train", "tfrecord", str(other))
    with pytest.raises(DataError, match="matches no files"):
        data.open_split("train", "tfrecord", str(tmp_path / "out" / "nothing-*"))
    with pytest.raises(DataError, match=r"has no validation-\* TFRecord shards"):
        data.open_split("validation", "tfrecord", str(tmp_path / "out"))
    # Each kind of data given as the other.
    with pytest.raises(DataError, match=r"imgs has no TFRecord shards but image files: pass "
                                        r"--dataset=folder to train on them$"):
        data.open_split("train", "tfrecord", str(tmp_path / "imgs"))
    with pytest.raises(DataError, match=r"out holds no images \(only files ending .*\); tapeloop "
                                        r"reads .*: they look like TFRecord shards: pass "
                                        r"--dataset=tfrecord$"):
        data.open_split("train", "folder", str(tmp_path / "out"))


def _write_records(path, features_of):
    with tf.io.TFRecordWriter(str(path)) as w:
        for features in features_of:
            w.write(tf.train.Example(features=tf.train.Features(feature={
                k: tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))
                if isinstance(v, bytes) else tf.train.Feature(int64_list=tf.train.Int64List(
                    value=v if isinstance(v, list) else [v])) for k, v in features.items()}
            )).SerializeToString())


def test_shards_whose_image_feature_is_not_model_gardens(tmp_path, caplog):
    """Shards of one's own (or a TFDS dataset's records) with the image under `image` and
    the class under `label`: read by finding the feature that holds an encoded image. They
    were refused for want of image/encoded."""
    pixels = colour_images(10)
    png = [tf.io.encode_png(a).numpy() for a in pixels]
    _write_records(tmp_path / "train-00000-of-00001",
                   [{"image": p, "label": i % 3, "id": b"x%d" % i} for i, p in enumerate(png)])
    source = data.open_split("train", "tfrecord", str(tmp_path)).source
    read = data.materialize(source)
    np.testing.assert_array_equal(read.images, pixels)
    np.testing.assert_array_equal(read.labels, [i % 3 for i in range(10)])
    # Two images per record: which one is meant is not guessed, but named by --image_feature.
    masks = 255 - pixels
    _write_records(tmp_path / "train-00000-of-00001",
                   [{"image": p, "mask": tf.io.encode_png(m).numpy(), "label": 2}
                    for p, m in zip(png, masks)])
    with pytest.raises(DataError, match=r"train-00000-of-00001: its examples hold several "
                                        r"encoded images \(image, mask\) and no image/encoded "
                                        r"feature, .*: name it, e.g. --image_feature=image$"):
        data.open_split("train", "tfrecord", str(tmp_path))
    for key, expected in (("mask", masks), ("image", pixels)):
        read = data.materialize(data.open_split("train", "tfrecord", str(tmp_path),
                                                image_feature=key).source)
        np.testing.assert_array_equal(read.images, expected)
        np.testing.assert_array_equal(read.labels, [2] * 10)
    for key, problem in (("nope", "has no feature 'nope'"),
                         ("label", "has no single bytes value in the feature 'label'")):
        with pytest.raises(DataError, match=rf"each example {problem} to hold its image \(its "
                                            r"features: image, label, mask\): give "
                                            r"--image_feature one that holds an image$"):
            data.open_split("train", "tfrecord", str(tmp_path), image_feature=key)
    # Labels that are not one int64 id are read unlabelled, and the log says why: class
    # names as bytes under `label`; so under Model Garden's names (image/encoded,
    # image/class/label), where they were a ParseExampleV2 'Data types don't match'
    # traceback at the first batch, as several ids a record (multi-label) were ('Some
    # int64_list slice was not parsed').
    for image_key, label_key, label, held in (
            ("image", "label", b"cat", "bytes"),
            ("image/encoded", "image/class/label", b"cat", "bytes"),
            ("image/encoded", "image/class/label", [1, 5], "2 int64 values")):
        _write_records(tmp_path / "train-00000-of-00001",
                       [{image_key: p, label_key: label} for p in png])
        caplog.clear()
        with caplog.at_level("INFO", logger="absl"):
            read = data.materialize(data.open_split("train", "tfrecord", str(tmp_path)).source)
        np.testing.assert_array_equal(read.images, pixels)
        assert read.labels is None
        assert (f"train: the feature {label_key!r} holds {held}, not one int64 class id: the "
                "examples are read unlabelled") in caplog.text
    # Shards of one split with the image under different features.
    _write_records(tmp_path / "train-00000-of-00002", [{"image": p} for p in png])
    _write_records(tmp_path / "train-00001-of-00002", [{"img": p} for p in png])
    os.remove(tmp_path / "train-00000-of-00001")
    with pytest.raises(DataError, match=r"train-00001-of-00002: its images are in the feature "
                                        r"img, those of .*train-00000-of-00002 in image"):
        data.open_split("train", "tfrecord", str(tmp_path))


def test_shards_of_raw_pixels_with_height_width_and_depth(tmp_path):
    """TF 1's convert_to_records.py wrote `image_raw` = the uint8 pixels' bytes beside
    height, width, depth and label: read by those; float32 pixels are refused in one line."""
    pixels = colour_images(6)
    grey = pixels[..., :1]
    _write_records(tmp_path / "train-00000-of-00001", [
        {"height": 24, "width": 32, "depth": 1, "label": i, "image_raw": a.tobytes()}
        for i, a in enumerate(grey)])
    opened = data.open_split("train", "tfrecord", str(tmp_path))
    read = data.materialize(opened.source)
    assert opened.source.image_shape == (24, 32, 1)
    np.testing.assert_array_equal(read.images, grey)
    np.testing.assert_array_equal(read.labels, range(6))
    # RGB without a depth feature: 3 bytes a pixel; asked for 16x16 (resized, as PNGs are).
    _write_records(tmp_path / "train-00000-of-00001", [
        {"rows": 24, "cols": 32, "image_raw": a.tobytes()} for a in pixels])
    source = data.open_split("train", "tfrecord", str(tmp_path), image_size=(16, 16)).source
    png = tmp_path / "png"
    png.mkdir()
    _write_records(png / "train-00000-of-00001",
                   [{"image": tf.io.encode_png(a).numpy()} for a in pixels])
    as_png = data.open_split("train", "tfrecord", str(png), image_size=(16, 16)).source
    np.testing.assert_array_equal(data.materialize(source).images,
                                  data.materialize(as_png).images)
    _write_records(tmp_path / "train-00000-of-00001", [
        {"height": 24, "width": 32, "depth": 1, "image_raw": a.astype(np.float32).tobytes()}
        for a in grey])
    with pytest.raises(DataError, match=r"its feature image_raw holds 3,072 bytes, not the height "
                                        r"x width \(24 x 32\) x depth bytes of uint8 pixels"):
        data.open_split("train", "tfrecord", str(tmp_path))
    # Raw pixels beside another bytes feature: found only when named.
    _write_records(tmp_path / "train-00000-of-00001", [
        {"height": 24, "width": 32, "depth": 1, "image_raw": a.tobytes(), "name": b"n%d" % i}
        for i, a in enumerate(grey)])
    with pytest.raises(DataError, match=r"no image/encoded feature, nor another that holds an "
                                        r"encoded image .*: name the one that does with "
                                        r"--image_feature, or write them"):
        data.open_split("train", "tfrecord", str(tmp_path))
    named = data.open_split("train", "tfrecord", str(tmp_path), image_feature="image_raw")
    np.testing.assert_array_equal(data.materialize(named.source).images, grey)
    with pytest.raises(DataError, match=r"its feature name holds 2 bytes, not the height x width "
                                        r"\(24 x 32\) x depth bytes of uint8 pixels \(float "
                                        r"pixels\?\): give --image_feature one that holds the image$"):
        data.open_split("train", "tfrecord", str(tmp_path), image_feature="name")
    _write_records(tmp_path / "train-00000-of-00001", [{"image_raw": a.tobytes(), "name": b"n"}
                                                       for a in grey])
    with pytest.raises(DataError, match=r"its feature 'image_raw' holds neither an encoded image "
                                        r".* nor uint8 pixels shaped by height and width "
                                        r"features \(its features: image_raw, name\)"):
        data.open_split("train", "tfrecord", str(tmp_path), image_feature="image_raw")


def test_prepare_rewrites_your_own_shards(tmp_path):
    """`python -m core.prepare --dataset=tfrecord`: shards of your own (any names and keys
    tapeloop reads) rewritten at the training size as raw pixels, with their labels, every
    split; never into the folder they are read from."""
    pixels = colour_images(10)
    (tmp_path / "mine").mkdir()
    _write_records(tmp_path / "mine" / "train.tfrecord",
                   [{"image": tf.io.encode_png(a).numpy(), "label": i % 2}
                    for i, a in enumerate(pixels[:7])])
    _write_records(tmp_path / "mine" / "val.tfrecord",
                   [{"image": tf.io.encode_png(a).numpy(), "label": 1} for a in pixels[7:]])
    info = prepare.convert("tfrecord", str(tmp_path / "out"), str(tmp_path / "mine"),
                           image_size=(12, 16), encoding="raw", shards=2, progress=None)
    assert {k: v["examples"] for k, v in info["splits"].items()} == {"train": 7, "val": 3}
    for split in ("train", "val"):
        theirs = data.open_split(split, "tfrecord", str(tmp_path / "mine"),
                                 image_size=(12, 16)).source
        ours = data.open_split(split, "tfrecord", str(tmp_path / "out")).source
        assert ours.batch_decodable  # raw pixels at the training size
        np.testing.assert_array_equal(data.materialize(ours).images,
                                      data.materialize(theirs).images)
        np.testing.assert_array_equal(ours.examples(range(7))[1], theirs.examples(range(7))[1])
        # --cache=DIR writes the same way: the labels are kept there too (they were -1).
        cached = data.cache_to_dir(theirs, str(tmp_path / "cache"))
        np.testing.assert_array_equal(cached.examples(range(7))[1], theirs.examples(range(7))[1])
    assert set(theirs.examples(range(3))[1]) == {1}
    # Named as it is found, and as tapeloop's own raw shards name it.
    named = prepare.convert("tfrecord", str(tmp_path / "named"), str(tmp_path / "mine"),
                            image_size=(12, 16), encoding="raw", shards=2, progress=None,
                            image_feature="image")
    assert {k: v["examples"] for k, v in named["splits"].items()} == {"train": 7, "val": 3}
    found = data.open_split("train", "tfrecord", str(tmp_path / "named")).source
    given = data.open_split("train", "tfrecord", str(tmp_path / "named"),
                            image_feature="image/encoded").source
    np.testing.assert_array_equal(data.materialize(given).images,
                                  data.materialize(found).images)
    with pytest.raises(ConfigError, match=r"--image_feature=image names the feature of "
                                          r"TFRecord examples .*: it goes with --dataset=tfrecord"):
        prepare.convert("folder", str(tmp_path / "f"), str(tmp_path / "mine"), progress=None,
                        image_feature="image")
    with pytest.raises(ConfigError, match=r"--output_dir=.*mine is --data_dir: the shards "
                                          r"written would join the split"):
        prepare.convert("tfrecord", str(tmp_path / "mine"), str(tmp_path / "mine") + "/",
                        progress=None)
    # Of a folder of images, among them (they were written there, beside the photos).
    photos = tmp_path / "photos"
    for i, a in enumerate(pixels[:2]):
        save(str(photos / f"{i}.png"), a)
    with pytest.raises(ConfigError, match=re.escape(
            f"--output_dir={photos} is --data_dir: the shards written would go in among your "
            f"data; choose another folder, e.g. --output_dir={photos}-shards")):
        prepare.convert("folder", str(photos), str(photos) + "/", progress=None)
    assert sorted(os.listdir(photos)) == ["0.png", "1.png"]


def test_record_files_named_split_dot_tfrecord(tmp_path):
    """`train.tfrecord` and `test.record` (as TensorFlow's TFRecord tutorial and the object
    detection API name them), with the tutorial's `image_raw` feature: each file is its
    split, as train-00000-of-00001 is; they were refused as "no train-* shards"."""
    pixels = colour_images(12)
    jpegs = [tf.io.encode_png(a).numpy() for a in pixels]
    _write_records(tmp_path / "train.tfrecord", [{"image_raw": p, "label": 1} for p in jpegs[:8]])
    _write_records(tmp_path / "test.record", [{"image_raw": p, "label": 2} for p in jpegs[8:]])
    _write_records(tmp_path / "train.tfrecord-00000-of-00001", [{"image_raw": jpegs[0]}])
    (tmp_path / "dataset_info.json.bak").write_text("{}")  # not a split
    assert sources.shard_splits(str(tmp_path)) == ["test", "train"]
    assert sources.default_splits("tfrecord", str(tmp_path)) == ("train", "test")
    assert [os.path.basename(f) for f in sources.shard_files(str(tmp_path), "train")] == [
        "train.tfrecord", "train.tfrecord-00000-of-00001"]
    train = data.materialize(data.open_split("train", "tfrecord", str(tmp_path)).source)
    np.testing.assert_array_equal(train.images, np.concatenate([pixels[:8], pixels[:1]]))
    test = data.materialize(data.open_split("test", "tfrecord", str(tmp_path)).source)
    np.testing.assert_array_equal(test.images, pixels[8:])
    assert [sources.split_of(n) for n in (
        "train-00000-of-00004", "val.tfrecords.gz", "my-data.tfrecord", "dataset_info.json",
        "train_003.tfrecord", "val2017-00000-of-00008", "mnist_v2.tfrecord", "cifar10.tfrecord",
        "00001.tfrecord")] == ["train", "val", "my", None, "train", "val2017", "mnist_v2",
                               "cifar10", None]
    # Numbered files of a split (train_000.tfrecord, ...) are that split's shards.
    for i in range(2):
        os.rename(tmp_path / ("train.tfrecord", "train.tfrecord-00000-of-00001")[i],
                  tmp_path / f"train_{i:03d}.tfrecord")
    assert sources.shard_splits(str(tmp_path)) == ["test", "train"]
    renamed = data.materialize(data.open_split("train", "tfrecord", str(tmp_path)).source)
    np.testing.assert_array_equal(renamed.images, train.images)


def _corrupt_middle(path):
    """A PNG whose header and IEND are intact but whose pixel data is not: it passes the
    up-front check and fails only when decoded, as a file damaged mid-run would."""
    raw = bytearray(path.read_bytes())
    start = raw.index(b"IDAT") + 8
    for i in range(start, start + 40):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))


def test_a_file_that_fails_mid_run_saves_and_names_it_or_is_skipped(tmp_path):
    png_tree(str(tmp_path / "imgs"), splits=(("train", 32), ("test", 8)))
    bad = tmp_path / "imgs" / "train" / "dog" / "011.png"
    _corrupt_middle(bad)
    images.check_file(str(bad))  # the up-front check cannot see it
    # The step whose batch holds it (4 steps an epoch), inside a loop of 3 steps, not at its
    # start: the count must stop at the batch that failed (it once counted that step too).
    index = data.open_split("train", "folder", str(tmp_path / "imgs")).source.paths.index(str(bad))
    failing = list(data.epoch_permutation(32, 0, 0).numpy()).index(index) // 8  # first epoch
    config = Config(dataset="folder", data_dir=str(tmp_path / "imgs"),
                    model_dir=str(tmp_path / "run"), epochs=None, train_steps=12, batch_size=8,
                    steps_per_loop=3, eval_every=100, log_every=100)
    with pytest.raises(DataError, match=rf"^{bad} \(Invalid PNG data.*\) failed to load at step "
                                        rf"{failing}; saved .*ckpt-{failing}: .*--bad_images=skip"):
        core.run(config)
    assert failing % 3 != 1 and failing > 0  # loops of 3 after the first step: 1-3, 4-6, ...
    assert tf.train.latest_checkpoint(str(tmp_path / "run")).endswith(f"-{failing}")
    result = core.run(config.replace(bad_images="skip"))  # resumes and goes on
    assert result["step"] == 12


def test_cache_memory_and_data_on_device_decode_once(tmp_path):
    png_tree(str(tmp_path / "imgs"), splits=(("train", 32), ("test", 8)))
    base = Config(dataset="folder", data_dir=str(tmp_path / "imgs"), epochs=None,
                  train_steps=4, batch_size=8, eval_every=4)
    streamed = core.run(base.replace(model_dir=str(tmp_path / "a"), data_on_device=False))
    cached = core.run(base.replace(model_dir=str(tmp_path / "b"), cache="memory",
                                   data_on_device=False))
    on_device = core.run(base.replace(model_dir=str(tmp_path / "c"), data_on_device=True))
    assert streamed["history"][-1]["loss"] == pytest.approx(cached["history"][-1]["loss"], 1e-5)
    assert streamed["history"][-1]["loss"] == pytest.approx(on_device["history"][-1]["loss"], 1e-5)
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["image_shape"] == [24, 32, 3] and saved["data_on_device"] is True


# ---------------------------------------------------------- tf.data service
def _free_ports(n):
    import socket

    socks = [socket.socket() for _ in range(n)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


def _service(num_workers):
    svc = tf.data.experimental.service
    dispatcher_port, *worker_ports = _free_ports(num_workers + 1)
    workers = [f"127.0.0.1:{p}" for p in worker_ports]
    dispatcher = svc.DispatchServer(svc.DispatcherConfig(port=dispatcher_port,
                                                         worker_addresses=workers))
    servers = [svc.WorkerServer(svc.WorkerConfig(
        dispatcher_address=f"127.0.0.1:{dispatcher_port}", worker_address=w,
        port=int(w.split(":")[1]))) for w in workers]
    return f"grpc://127.0.0.1:{dispatcher_port}", (dispatcher, servers)


def test_training_through_a_tf_data_service(tmp_path):
    """One service worker: exactly the local batches. Two: each batch made once, by one
    worker, and each one of the local run's; the service fixes their order only loosely
    (round-robin over the workers, in the order they joined the job), so the test does
    not pin it."""
    one, keep_one = _service(1)
    two, keep_two = _service(2)
    png_tree(str(tmp_path / "imgs"), splits=(("train", 40), ("test", 8)))
    prepare_shards(str(tmp_path / "imgs"), str(tmp_path / "shards"), shards=2)
    for kind, where in (("folder", "imgs"), ("tfrecord", "shards")):
        src = data.open_split("train", kind, str(tmp_path / where)).source
        local = _first_batches(data.train_dataset(src, 8, seed=2, start_step=3), 8)
        remote = _first_batches(data.train_dataset(src, 8, seed=2, start_step=3, service=one), 8)
        for step, (x, y) in enumerate(zip(local, remote)):
            np.testing.assert_array_equal(x, y, err_msg=f"{kind} step {step}")
        remote = _first_batches(data.train_dataset(src, 8, seed=2, start_step=3, service=two), 8)
        ahead = _first_batches(data.train_dataset(src, 8, seed=2, start_step=3), 16)
        made = [bytes(b) for b in remote]
        assert len(set(made)) == 8, f"{kind}: a batch was made twice"
        assert set(made) <= {bytes(b) for b in ahead}, f"{kind}: a batch the local run lacks"
    config = Config(dataset="folder", data_dir=str(tmp_path / "imgs"),
                    model_dir=str(tmp_path / "run"), epochs=None, train_steps=4, batch_size=8,
                    eval_every=4, tf_data_service=two)
    assert core.run(config)["step"] == 4
    with pytest.raises(ConfigError, match="in memory and has none"):
        Config(dataset="mnist", tf_data_service=one)
    del keep_one, keep_two


def test_an_unreachable_tf_data_service_is_one_line_not_a_hang(tmp_path, monkeypatch):
    """TensorFlow's client retries a dispatcher that is not there forever; the run waits
    SERVICE_WAIT_SECONDS for one to come up, then stops before writing anything."""
    (port,) = _free_ports(1)
    dead = f"grpc://127.0.0.1:{port}"
    with pytest.raises(ConfigError, match=rf"--tf_data_service={dead}: no dispatcher answers at "
                       rf"127.0.0.1:{port} \(Connection refused, for 0.5 s\): start it first"):
        data.wait_for_service(dead, 0.5)
    live, keep = _service(1)
    data.wait_for_service(live, 0.5)  # returns: a dispatcher listens
    from core import runner

    monkeypatch.setattr(runner, "SERVICE_WAIT_SECONDS", 0.5)
    png_tree(str(tmp_path / "imgs"), splits=(("train", 16), ("test", 8)))
    config = Config(dataset="folder", data_dir=str(tmp_path / "imgs"),
                    model_dir=str(tmp_path / "run"), epochs=None, train_steps=2, batch_size=8,
                    tf_data_service=dead)
    with pytest.raises(ConfigError, match="no dispatcher answers"):
        core.run(config)
    assert not (tmp_path / "run").exists()
    del keep


def test_cache_dir_decodes_once_into_shards_and_reuses_them(tmp_path):
    png_tree(str(tmp_path / "imgs"), splits=(("train", 32), ("test", 8)))
    src = data.open_split("train", "folder", str(tmp_path / "imgs"), image_size=(12, 16)).source
    cached = data.cache_to_dir(src, str(tmp_path / "cache"))
    assert cached.kind == "tfrecord" and cached.num_examples == 32
    assert cached.image_shape == (12, 16, 3)
    np.testing.assert_array_equal(data.materialize(cached).images, data.materialize(src).images)
    np.testing.assert_array_equal(cached.examples(range(32))[1], src.labels)  # labels travel along
    assert cached.raw_channels == 3  # raw pixels: reading them decodes nothing
    folders = os.listdir(tmp_path / "cache")
    assert len(folders) == 1 and folders[0].startswith("folder-")
    stamp = os.stat(tmp_path / "cache" / folders[0] / "dataset_info.json").st_mtime_ns
    again = data.cache_to_dir(src, str(tmp_path / "cache"))  # reused, not rewritten
    assert again.files == cached.files
    assert os.stat(tmp_path / "cache" / folders[0] / "dataset_info.json").st_mtime_ns == stamp
    other = data.open_split("train", "folder", str(tmp_path / "imgs"), image_size=(8, 8)).source
    data.cache_to_dir(other, str(tmp_path / "cache"))  # another decoding: its own cache
    assert len(os.listdir(tmp_path / "cache")) == 2
    # An image saved again under its name (edited, re-exported): the cache was of the old
    # file, and a run trained on its old pixels.
    edited = src.paths[5]
    save(edited, np.full((24, 32, 3), 200, np.uint8))
    src = data.open_split("train", "folder", str(tmp_path / "imgs"), image_size=(12, 16)).source
    fresh = data.cache_to_dir(src, str(tmp_path / "cache"))
    assert len(os.listdir(tmp_path / "cache")) == 3
    images = data.materialize(fresh).images
    np.testing.assert_array_equal(images, data.materialize(src).images)
    assert (images[5] == 200).all()
    config = Config(dataset="folder", data_dir=str(tmp_path / "imgs"), cache=str(tmp_path / "c2"),
                    model_dir=str(tmp_path / "run"), epochs=None, train_steps=4, batch_size=8,
                    eval_every=4)
    assert core.run(config)["step"] == 4
    assert len(os.listdir(tmp_path / "c2")) == 2  # the train and the test split


def test_folders_with_a_bracket_in_their_name_are_folders_not_patterns(tmp_path):
    """'[' in a folder's name ('shards [2023]', a --cache dir) is a set in a file pattern:
    the shards in it matched nothing ('matches no files: check the pattern'), a second run
    could not read its own --cache, and core.prepare did not see the shards it would
    overwrite. A folder that exists is taken as a folder, its name literally."""
    png_tree(str(tmp_path / "imgs [a]"), splits=(("train", 16), ("test", 8)))
    out = str(tmp_path / "shards [2023]")
    prepare_shards(str(tmp_path / "imgs [a]"), out, shards=2)
    with pytest.raises(ConfigError, match=r"already holds shards: pass --overwrite"):
        prepare_shards(str(tmp_path / "imgs [a]"), out, shards=2)
    shards = data.open_split("train", "tfrecord", out).source
    folder = data.open_split("train", "folder", str(tmp_path / "imgs [a]")).source
    assert shards.num_examples == 16 and sources.shard_splits(out) == ["test", "train"]
    np.testing.assert_array_equal(data.materialize(shards).images,
                                  data.materialize(folder).images)
    config = Config(dataset="folder", data_dir=str(tmp_path / "imgs [a]"),
                    cache=str(tmp_path / "cache [x]"), model_dir=str(tmp_path / "run"),
                    epochs=None, train_steps=2, batch_size=8, eval_every=2)
    assert core.run(config)["step"] == 2
    assert core.run(config.replace(model_dir=str(tmp_path / "again")))["step"] == 2  # reads it
    assert len(os.listdir(tmp_path / "cache [x]")) == 2
    # A pattern of shards in such a folder: the folder's part literally, the rest a pattern.
    assert len(sources.shard_files(os.path.join(out, "train-*"), "train")) == 2


# ------------------------------------------------------------ remote storage
def test_the_up_front_check_logs_how_far_it_is_and_finds_bad_files_anywhere(tmp_path, caplog):
    """A long check logs progress (here after every file); results keep the paths' order."""
    paths = [str(tmp_path / f"{i:02d}.png") for i in range(12)]
    for p, a in zip(paths, colour_images(12)):
        save(p, a)
    with open(paths[7], "wb") as f:
        f.write(b"not an image")
    with caplog.at_level("INFO", logger="absl"):
        infos, bad = sources.scan(paths, what="the image files of train", progress_every=0.0)
    assert [i.path if i else None for i in infos] == [p if p != paths[7] else None for p in paths]
    assert list(bad) == [paths[7]] and "not an image" in bad[paths[7]]
    progress = [r.getMessage() for r in caplog.records if "checking the image files" in r.getMessage()]
    assert progress and progress[-1].startswith("checking the image files of train: 11 of 12 files")


def test_a_folder_that_opens_slowly_logs_how_to_start_faster(tmp_path, caplog, monkeypatch):
    png_tree(str(tmp_path / "imgs"), splits=(("train", 16), ("test", 8)))
    from core import runner

    monkeypatch.setattr(runner, "LONG_FOLDER_CHECK_SECONDS", 0.0)  # every open is "slow"
    config = Config(dataset="folder", data_dir=str(tmp_path / "imgs"),
                    model_dir=str(tmp_path / "run"), epochs=None, train_steps=1, batch_size=8)
    with caplog.at_level("INFO", logger="absl"):
        core.run(config)
    hint = [r.getMessage() for r in caplog.records if "core.prepare --dataset=folder" in r.getMessage()]
    assert hint == [f"a folder's files are checked at every start of a run that reads them (a "
                    f"resume, an evaluation); python -m core.prepare --dataset=folder "
                    f"--data_dir={tmp_path / 'imgs'} --output_dir=DIR checks them once and "
                    "writes TFRecord shards, which start without it"]
    caplog.clear()
    monkeypatch.setattr(runner, "LONG_FOLDER_CHECK_SECONDS", 3600.0)
    with caplog.at_level("INFO", logger="absl"):
        core.run(config.replace(train_steps=2))
    assert not any("core.prepare" in r.getMessage() for r in caplog.records)


def test_object_stores_are_checked_with_more_threads_than_a_local_disk():
    assert sources.is_remote("gs://bucket/imgs/a.png") and sources.is_remote("ram://x/a.png")
    assert not sources.is_remote("/data/imgs/a.png") and not sources.is_remote("file:///a.png")


def test_a_whole_run_on_ram_filesystem(tmp_path):
    """Data, checkpoints, events, config.json, figures, lock and export through tf.io.gfile."""
    for split, arrays in (("train", colour_images(32)), ("test", colour_images(8, seed=1))):
        for i, a in enumerate(arrays):
            save(f"ram://imgs/{split}/c{i % 2}/{i:02d}.png", a)
    config = Config(dataset="folder", data_dir="ram://imgs", model_dir="ram://runs/one",
                    epochs=None, train_steps=4, batch_size=8, eval_every=2)
    assert core.run(config)["step"] == 4
    files = set(tf.io.gfile.listdir("ram://runs/one"))
    assert {"checkpoint", "config.json", "reconstructions.png", "curves.png"} <= files
    assert any(f.startswith("ckpt-4") for f in files) and ".lock" not in files
    Image.open(io.BytesIO(tf.io.gfile.GFile("ram://runs/one/reconstructions.png", "rb").read()))
    assert core.run(config.replace(mode="eval"))["step"] == 4
    exported = core.run(config.replace(mode="export"))["export_dir"]
    tf.io.gfile.makedirs("ram://runs/one/export/.4.tmp/variables")  # as an upload does
    with tf.io.gfile.GFile("ram://runs/one/export/.4.tmp/variables/half", "w") as f:
        f.write("what a stopped export's upload left")
    assert core.run(config.replace(mode="export"))["export_dir"] == exported  # replaced
    assert tf.io.gfile.listdir("ram://runs/one/export") == ["4"]  # the leftover removed
    assert sorted(tf.io.gfile.listdir(exported)) == [
        "assets.extra", "fingerprint.pb", "saved_model.pb", "variables"]
    record = tf.io.gfile.GFile(exported + "/assets.extra/tapeloop.json").read()
    assert json.loads(record)["checkpoint"] == "ram://runs/one/ckpt-4"  # uploaded with it
    loaded = tf.saved_model.load(exported)
    out = loaded.signatures["reconstruct"](images=tf.zeros([1, 24, 32, 3]))["images"]
    assert out.shape == (1, 24, 32, 3)
    assert not os.path.exists("ram:")  # nothing leaked onto the local disk


def test_remote_lock_is_a_lease_with_a_heartbeat():
    first = ModelDirLock("ram://leases/run")
    tf.io.gfile.makedirs("ram://leases/run")
    first.acquire()
    try:
        with pytest.raises(CheckpointError, match="in use by a live run .*heartbeat 0 s ago"):
            ModelDirLock("ram://leases/run").acquire()
    finally:
        first.release()
    assert not tf.io.gfile.exists("ram://leases/run/.lock")
    with tf.io.gfile.GFile("ram://leases/run/.lock", "w") as f:  # a dead run's lease
        f.write(json.dumps({"owner": "pid 1 on gone", "heartbeat": 0}))
    taker = ModelDirLock("ram://leases/run")
    taker.acquire()  # stale: taken over
    assert json.loads(tf.io.gfile.GFile("ram://leases/run/.lock").read())["owner"] == taker.owner
    taker.release()


def test_a_split_larger_than_memory_is_refused_before_decoding(tmp_path):
    """--cache=memory (or --data_on_device) of splits whose pixels do not fit in the memory
    available: one line before a file is decoded, not a decode of hours that the kernel
    then kills without a word. The size asked for makes the 32 training files alone more
    than this machine has, whatever it has."""
    png_tree(str(tmp_path / "imgs"), splits=(("train", 32), ("test", 8)))
    have = data.available_memory()
    side = math.ceil(math.sqrt(have / (32 * 3))) + 32
    base = Config(dataset="folder", data_dir=str(tmp_path / "imgs"), epochs=None,
                  train_steps=4, batch_size=8, image_size=(side, side),
                  model_dir=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^--cache=memory: decoding test and train into "
                       r"memory needs [\d,.]+ GiB, more than the [\d,.]+ GiB available here: "
                       r"give --cache=DIR .*--cache=none$"):
        core.run(base.replace(cache="memory"))
    with pytest.raises(ConfigError, match=r"^--data_on_device: decoding train into memory"):
        core.run(base.replace(data_on_device=True, data_on_device_max_mb=10**7))
    assert not os.path.exists(tmp_path / "run" / "checkpoint")


def test_large_images_decode_into_memory_in_batches_within_256_mb(tmp_path):
    """--cache=memory of large images decodes them a few at a time (tf.data's batch of 108
    4096x4096 images failed to allocate its 5 GB with 22 GB free): 2048x2048x3 images go 21
    a batch, and the array holds every image in its place across batches."""
    png_tree(str(tmp_path / "imgs"), splits=(("train", 32),))
    source = data.open_split("train", "folder", str(tmp_path / "imgs"),
                             image_size=(2048, 2048)).source
    split = data.materialize(source)
    assert split.images.shape == (32, 2048, 2048, 3)
    for i in (0, 20, 21, 31):  # either side of the first batch's end
        np.testing.assert_array_equal(split.images[i], source.decode_index(i).numpy())
