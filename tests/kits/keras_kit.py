"""The Keras 3 kit: Keras's own ``compile``/``fit`` loop and a ``.keras`` round trip.

The reference model is built as the Keras transfer-learning guide builds one: a functional
``base`` called with ``training=False`` inside a functional model (DESIGN §1.3)."""

from __future__ import annotations

import os

import keras

from kits import reference_model


class KerasKit:
    id = f"keras-{keras.backend.backend()}"
    bn_names = {"gamma": "gamma", "beta": "beta", "mean": "moving_mean", "var": "moving_variance"}
    dense_kernel = "kernel"
    running_var_unbiased = False

    def model(self, seed: int = 0, dropout: float = 0.5) -> keras.Model:
        return reference_model("keras", seed, dropout)

    def fit(self, model, x, y, epochs=2, batch_size=8, lr=1e-2, optimizer="adamw"):
        # The native loop: compile after the xfer calls, as Keras requires, then fit.
        model.compile(
            optimizer={
                "adamw": lambda: keras.optimizers.AdamW(lr, weight_decay=0.1),
                "adam": lambda: keras.optimizers.Adam(lr, epsilon=1e-12),
                "sgd": lambda: keras.optimizers.SGD(lr),
            }[optimizer](),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=False, verbose=0)
        return [float(v) for v in history.history["loss"]]

    def predict(self, model, x):
        return keras.ops.convert_to_numpy(model(x, training=False))

    def forward_train(self, model, x):
        return keras.ops.convert_to_numpy(model(x, training=True))

    def save_load(self, model, directory):
        path = os.path.join(directory, "model.keras")
        model.save(path)
        return keras.models.load_model(path)


KIT = KerasKit()
