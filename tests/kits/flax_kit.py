"""The Flax NNX kit: the training loop of the Flax docs and a values-only checkpoint."""

from __future__ import annotations

import functools
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.nnx import traversals

from kits import reference_model


@functools.cache
def _transform(optimizer: str, lr: float) -> optax.GradientTransformation:
    # One transformation object per (optimizer, learning rate): it is static in the
    # optimizer's graphdef, so reusing it lets nnx.jit reuse compiled steps across tests.
    return {
        "adamw": lambda: optax.adamw(lr, weight_decay=0.1),
        "adam": lambda: optax.adam(lr, eps=1e-12),
        "sgd": lambda: optax.sgd(lr),
    }[optimizer]()


def _loss(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def _train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


# The variables of a checkpoint: everything but the RNG streams (their typed keys are
# not numpy data, and a fresh model has its own).
_CHECKPOINTED = nnx.Not(nnx.RngState)


class FlaxKit:
    id = "flax"
    bn_names = {"gamma": "scale", "beta": "bias", "mean": "mean", "var": "var"}
    dense_kernel = "kernel"
    running_var_unbiased = False

    def model(self, seed: int = 0, dropout: float = 0.5):
        return reference_model("flax", seed, dropout)

    def fit(self, model, x, y, epochs=2, batch_size=8, lr=1e-2, optimizer="adamw"):
        # The Flax docs loop: Optimizer over nnx.Param, value_and_grad, model.train().
        opt = nnx.Optimizer(model, _transform(optimizer, lr), wrt=nnx.Param)
        xs, ys = jnp.asarray(x), jnp.asarray(y, dtype=jnp.int32)
        losses = []
        for _ in range(epochs):
            model.train()
            for i in range(0, len(xs), batch_size):
                loss = _train_step(model, opt, xs[i : i + batch_size], ys[i : i + batch_size])
                losses.append(float(loss))
        return losses

    def predict(self, model, x):
        model.eval()
        return np.asarray(model(jnp.asarray(x)))

    def forward_train(self, model, x):
        model.train()
        return np.asarray(model(jnp.asarray(x)))

    def save_load(self, model, directory):
        # A pure dict holds values only, so it loads into the fresh model's Params even
        # where the saved model had xfer's Frozen variables: types are not saved.
        pure = nnx.to_pure_dict(nnx.state(model, _CHECKPOINTED))
        flat = {k: np.asarray(v) for k, v in traversals.flatten_mapping(pure).items()}
        path = os.path.join(directory, "model.pkl")
        with open(path, "wb") as f:
            pickle.dump(flat, f)
        with open(path, "rb") as f:
            loaded = traversals.unflatten_mapping(pickle.load(f))
        fresh = self.model()
        state = nnx.state(fresh, _CHECKPOINTED)
        nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, loaded))
        nnx.update(fresh, state)
        return fresh


KIT = FlaxKit()
