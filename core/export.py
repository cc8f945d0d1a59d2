"""SavedModel export with `encode`, `decode` and `reconstruct` serving signatures.

The SavedModel needs neither tapeloop nor Keras to load: `tf.saved_model.load`
returns an object whose `.signatures` run the traced graphs.

Signatures (N is any batch size; H, W, C the image shape; h, w, c the code's):
  encode(images: float32 [N, H, W, C] in [0, 1]) -> {"code": float32 [N, h, w, c]}
  decode(code: float32 [N, h, w, c]) -> {"images": float32 [N, H, W, C] in [0, 1]}
  reconstruct(images: float32 [N, H, W, C] in [0, 1]) -> {"images": float32 [N, H, W, C]}
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile

import tensorflow as tf

from core.errors import WriteError, write_reason
from core.process import WRITE_ERRORS

RECORD = "tapeloop.json"  # in assets.extra/: the checkpoint the export is of, and its step


def _checked(tensor, shape, signature, name):
    """`tensor`, once a check in the graph found it [N, *shape].

    A served signature does not check its input's shape: `.signatures[...]`, TF Serving and
    `saved_model_cli run` feed any shape to the graph. Another image size failed deep inside
    the model (`Input to reshape is a tensor with 14336 values...`), and images without the
    batch axis aborted the whole process in oneDNN's convolution (`Check failed: index >= 0`).
    The shape is compared as text, which holds for any rank, not as a tensor the graph
    optimiser could fold from the declared shape."""
    want = ",".join(str(d) for d in shape)
    got = tf.strings.reduce_join(tf.strings.as_string(tf.shape(tensor)[1:]), separator=",")
    fix = (f"resize them first, e.g. tf.image.resize(images, {tuple(shape[:2])})"
           if name == "images" else "the shape of this model's `encode` output")
    check = tf.debugging.Assert(tf.equal(got, want), [
        f"{signature}: `{name}` must be float32 [N, {', '.join(str(d) for d in shape)}] "
        f"(N any batch size), the shape this model was exported for: {fix}. Got shape",
        tf.shape(tensor)], summarize=8)
    with tf.control_dependencies([check]):
        return tf.identity(tensor)


class _Serving(tf.Module):
    """The signatures, and the tf.Variables they read.

    The model is held by the functions' closures, not tracked: what the SavedModel tracks is
    the tf.Variables the traced signatures read, once each. Tracking the Keras model instead
    (Keras 3 Variables wrap a tf.Variable each) loads with `tf.saved_model.load` but not with
    the graph loaders of TF Serving and `saved_model_cli run`, which then find no value for
    the handles the graph reads ("Could not find variable ...": keras-team/keras#20095);
    Keras' own `model.export()` tracks the same variables this way."""

    def __init__(self, model, image_shape, code_shape):
        super().__init__(name="tapeloop_autoencoder")
        images = tf.TensorSpec([None, *image_shape], tf.float32, name="images")
        code = tf.TensorSpec([None, *code_shape], tf.float32, name="code")

        def encode(images):
            images = _checked(images, image_shape, "encode", "images")
            return {"code": tf.cast(model.encode(images, training=False), tf.float32)}

        def decode(code):
            code = _checked(code, code_shape, "decode", "code")
            return {"images": tf.cast(model.decode(code, training=False), tf.float32)}

        def reconstruct(images):
            images = _checked(images, image_shape, "reconstruct", "images")
            return {"images": tf.cast(model.reconstruct(images, training=False), tf.float32)}

        self.encode = tf.function(encode, input_signature=[images])
        self.decode = tf.function(decode, input_signature=[code])
        self.reconstruct = tf.function(reconstruct, input_signature=[images])
        # Named by their Keras paths (seed/encoder/down0/kernel), so the SavedModel's
        # variables read as the model's.
        paths = {id(v if isinstance(v, tf.Variable) else v.value): getattr(v, "path", v.name)
                 for v in model.variables}
        read, seen = {}, set()
        for fn in (self.encode, self.decode, self.reconstruct):
            for variable in fn.get_concrete_function().variables:
                if id(variable) not in seen:
                    seen.add(id(variable))
                    name = paths.get(id(variable), variable.name)
                    while name in read:  # two layers of one name
                        name += "_"
                    read[name] = variable
        self.model_variables = read


def export_saved_model(model, image_shape, export_dir: str, record: dict | None = None) -> str:
    """Writes the SavedModel to `export_dir`, replacing one there only once the new one is
    complete; returns it. `record` (the checkpoint it is of) goes in as
    `assets.extra/tapeloop.json`, where a SavedModel keeps files its loaders ignore."""
    code_shape = tuple(model.encode(tf.zeros((1, *image_shape))).shape[1:])
    module = _Serving(model, tuple(image_shape), code_shape)
    signatures = {"encode": module.encode, "decode": module.decode,
                  "reconstruct": module.reconstruct, "serving_default": module.reconstruct}
    tf.io.gfile.makedirs(os.path.dirname(export_dir))
    # Beside it, under names no server takes for a version (TF Serving watches numbered
    # folders) and that do not start with its name (ram:// matches folders by prefix).
    parent, name = os.path.split(export_dir.rstrip("/"))
    tmp, old = os.path.join(parent, f".{name}.tmp"), os.path.join(parent, f".{name}.old")
    if "://" in export_dir:
        # Object stores cannot rename a folder (gs:// renames object by object; ram://
        # loses the files). Saved locally, the files are uploaded beside, then moved in one
        # by one on the store's side, saved_model.pb last, so a loader never finds it
        # without its variables. A stopped upload leaves the previous export as it was.
        if tf.io.gfile.exists(tmp):  # of an export that was stopped
            tf.io.gfile.rmtree(tmp)
        with tempfile.TemporaryDirectory() as local:
            tf.saved_model.save(module, local, signatures=signatures)
            _write_record(local, record)
            files = sorted((os.path.relpath(os.path.join(d, f), local)
                            for d, _, names in os.walk(local) for f in names),
                           key=lambda r: r == "saved_model.pb")
            for rel in files:
                tf.io.gfile.makedirs(os.path.dirname(os.path.join(tmp, rel)))
                tf.io.gfile.copy(os.path.join(local, rel), os.path.join(tmp, rel))
        if tf.io.gfile.exists(export_dir):
            tf.io.gfile.rmtree(export_dir)
        for rel in files:
            tf.io.gfile.makedirs(os.path.dirname(os.path.join(export_dir, rel)))
            tf.io.gfile.rename(os.path.join(tmp, rel), os.path.join(export_dir, rel))
        tf.io.gfile.rmtree(tmp)
        return export_dir
    for leftover in (tmp, old):  # of an export that was stopped
        if tf.io.gfile.exists(leftover):
            tf.io.gfile.rmtree(leftover)
    try:
        tf.saved_model.save(module, tmp, signatures=signatures)
        _write_record(tmp, record)
    except WRITE_ERRORS as e:  # a full disk: the export there before stays as it was
        with contextlib.suppress(OSError, tf.errors.OpError):
            tf.io.gfile.rmtree(tmp)
        raise WriteError(f"the export {export_dir}", write_reason(e)) from None
    # A half-written export never has the final name, and the one it replaces is kept
    # until it is written.
    if tf.io.gfile.exists(export_dir):
        tf.io.gfile.rename(export_dir, old)
    tf.io.gfile.rename(tmp, export_dir)
    if tf.io.gfile.exists(old):
        tf.io.gfile.rmtree(old)
    return export_dir


def _write_record(saved_model_dir: str, record: dict | None) -> None:
    if record is not None:
        tf.io.gfile.makedirs(os.path.join(saved_model_dir, "assets.extra"))
        with tf.io.gfile.GFile(os.path.join(saved_model_dir, "assets.extra", RECORD), "w") as f:
            f.write(json.dumps(record, indent=2))
