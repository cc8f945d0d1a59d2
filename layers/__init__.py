"""tapeloop layers: reusable blocks and the autoencoder models (subclassed tf.keras.Model)."""
