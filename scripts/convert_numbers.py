"""Measure what docs/convert.md records: a random keras.applications.ResNet50 converted to
xfer's ResNet-50 on Keras, torch and Flax and back, and the largest |logit difference| of
every pair of them, in inference mode.

    KERAS_BACKEND=jax python scripts/convert_numbers.py     # Keras on the JAX engine
    KERAS_BACKEND=torch python scripts/convert_numbers.py   # ... on the torch engine

BN statistics and affine values are drawn away from 0/1 first (as tests/test_convert.py
does), so that a layout mistake shows; 4 images of 32x32x3 from N(0, 1).
"""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import keras  # noqa: E402
from test_convert import _applications, _predict, _randomise  # noqa: E402

import xfer  # noqa: E402


def main() -> None:
    x = np.random.default_rng(0).normal(0.0, 1.0, (4, 32, 32, 3)).astype("float32")
    engine = keras.backend.backend()
    for include_top, pooling in ((True, None), (False, "avg")):
        source = _applications(include_top, pooling)
        _randomise(source)
        outputs = {"keras.applications": _predict("keras", source, x)}
        model = xfer.convert(source, "keras")
        outputs[f"keras-{engine}"] = _predict("keras", model, x)
        for backend in ("torch", "flax"):
            model = xfer.convert(model, backend)
            outputs[backend] = _predict(backend, model, x)
        back = xfer.convert(model, "keras", keras_applications=True)
        outputs["keras.applications (back)"] = _predict("keras", back, x)
        before, after = xfer.export_weights(source), xfer.export_weights(back)
        same = all(np.array_equal(before[k], after[k]) for k in before)
        scale = float(np.abs(outputs["keras.applications"]).max())
        print(f"\ninclude_top={include_top} pooling={pooling} (largest |output| {scale:.2f}):")
        for a, b in itertools.combinations(outputs, 2):
            print(f"  {a:>26} vs {b:<26} {np.abs(outputs[a] - outputs[b]).max():.1e}")
        print(f"  every weight bit-identical after the round trip: {same}")


if __name__ == "__main__":
    main()
