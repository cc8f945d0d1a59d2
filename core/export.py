"""SavedModel export with `encode`, `decode` and `reconstruct` serving signatures.

The SavedModel needs neither tapeloop nor Keras to load: `tf.saved_model.load`
returns an object whose `.signatures` run the traced graphs.

Signatures (N is any batch size; H, W, C the image shape; h, w, c the code's):
  encode(images: float32 [N, H, W, C] in [0, 1]) -> {"code": float32 [N, h, w, c]}
  decode(code: float32 [N, h, w, c]) -> {"images": float32 [N, H, W, C] in [0, 1]}
  reconstruct(images: float32 [N, H, W, C] in [0, 1]) -> {"images": float32 [N, H, W, C]}
"""

from __future__ import annotations

import os
import tempfile

import tensorflow as tf


class _Serving(tf.Module):
    def __init__(self, model, image_shape, code_shape):
        super().__init__(name="tapeloop_autoencoder")
        self.model = model
        images = tf.TensorSpec([None, *image_shape], tf.float32, name="images")
        code = tf.TensorSpec([None, *code_shape], tf.float32, name="code")
        self.encode = tf.function(self._encode, input_signature=[images])
        self.decode = tf.function(self._decode, input_signature=[code])
        self.reconstruct = tf.function(self._reconstruct, input_signature=[images])

    def _encode(self, images):
        return {"code": tf.cast(self.model.encode(images, training=False), tf.float32)}

    def _decode(self, code):
        return {"images": tf.cast(self.model.decode(code, training=False), tf.float32)}

    def _reconstruct(self, images):
        return {"images": tf.cast(self.model.reconstruct(images, training=False), tf.float32)}


def export_saved_model(model, image_shape, export_dir: str) -> str:
    """Writes the SavedModel to `export_dir`, replacing one there only once the new one is
    complete; returns it."""
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
    tf.saved_model.save(module, tmp, signatures=signatures)
    # A half-written export never has the final name, and the one it replaces is kept
    # until it is written.
    if tf.io.gfile.exists(export_dir):
        tf.io.gfile.rename(export_dir, old)
    tf.io.gfile.rename(tmp, export_dir)
    if tf.io.gfile.exists(old):
        tf.io.gfile.rmtree(old)
    return export_dir
