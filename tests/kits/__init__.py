"""Per-backend test kits: the framework's *own* training loop, written as a user would.

The model is ``xfer.models.small_cnn`` (a plain native model of each framework) with the
same unit paths everywhere::

    base                (container)
    base.block1         (container)   conv -> bn -> relu
    base.block1.conv    (conv)
    base.block1.bn      (batchnorm)   epsilon 1e-3, keras/flax momentum 0.9 (torch 0.1)
    base.block2, base.block2.conv, base.block2.bn
    base.drop           (dropout)
    base.pool           (other)       global average pooling
    head                (container)
    head.drop           (dropout)
    head.dense          (dense)

Each kit implements the ``Kit`` interface below with no xfer code in the training loop.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import numpy as np

UNIT_PATHS = [
    "base",
    "base.block1",
    "base.block1.conv",
    "base.block1.bn",
    "base.block2",
    "base.block2.conv",
    "base.block2.bn",
    "base.drop",
    "base.pool",
    "head",
    "head.drop",
    "head.dense",
]
NUM_CLASSES = 4
IMAGE_SHAPE = (8, 8, 3)  # channels-last; the torch kit transposes


class Kit(Protocol):
    id: str  # "torch", "keras-jax", "keras-torch", "flax"
    bn_names: dict[str, str]  # neutral role -> native leaf name: gamma, beta, mean, var
    dense_kernel: str  # native leaf name of a dense kernel
    running_var_unbiased: bool  # BN moving variance updated with the unbiased batch variance

    def model(self, seed: int = 0, dropout: float = 0.5) -> Any:
        """The standard test model, built and initialised (its weights exist)."""

    def fit(
        self,
        model: Any,
        x: np.ndarray,
        y: np.ndarray,
        epochs: int = 2,
        batch_size: int = 8,
        lr: float = 1e-2,
    ) -> list[float]:
        """Train with the framework's standard loop (AdamW, weight decay 0.1); return losses."""

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Logits in the framework's inference mode."""

    def forward_train(self, model: Any, x: np.ndarray) -> np.ndarray:
        """Logits of one forward pass in the framework's training mode (may update BN stats)."""

    def save_load(self, model: Any, directory: str) -> Any:
        """Save with the framework's usual format and load into a new model object."""


def data(n: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Channels-last images with a non-zero mean (so BN statistics move) and labels."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 2.0, size=(n, *IMAGE_SHAPE)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=n).astype("int64")
    return x, y


def reference_model(backend: str, seed: int, dropout: float) -> Any:
    import xfer

    return xfer.models.small_cnn(
        NUM_CLASSES, IMAGE_SHAPE[2], width=8, dropout=dropout, seed=seed, backend=backend
    )


def load_kit(kit_id: str) -> Kit:
    module = {
        "torch": "torch_kit",
        "keras-jax": "keras_kit",
        "keras-torch": "keras_kit",
        "flax": "flax_kit",
    }[kit_id]
    return importlib.import_module(f"kits.{module}").KIT
