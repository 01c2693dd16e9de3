"""``precision="bf16"``: mixed precision with each framework's own mechanism (PyTorch
autocast, Keras's ``mixed_bfloat16`` policy, Flax layer dtypes), on models built in float32.

What must hold: the step computes in bfloat16 (its losses differ from float32's, a probe
layer sees bfloat16 inside the step); weights, BN moving statistics and the optimizer state
stay float32; frozen tensors stay bit-identical; and after the run the model computes in its
own precision again.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import xfer
from kits import data
from xfer import select as S
from xfer._adapter import find_adapter
from xfer.cli import main


def _stages():
    return [
        xfer.Stage("head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05),
        xfer.Stage("finetune", train=S.all(), bn="train", lr=0.01, epochs=2),
    ]


def _fit(model, **options):
    pipe = xfer.TransferPipeline(model, _stages(), optimizer="adam", batch_size=8, **options)
    return pipe.fit(data(32), data(12, seed=1))


def test_bf16_trains_float32_weights_close_to_float32_and_leaves_the_model_float32(kit):
    plain = kit.model(seed=3, dropout=0.0)
    plain_history = _fit(plain)
    mixed = kit.model(seed=3, dropout=0.0)
    start = xfer.export_weights(mixed)
    history = _fit(mixed, precision="bf16")
    assert history.ok  # every frozen tensor bit-identical, in both stages
    assert history.precision == "bfloat16" and "bfloat16 mixed precision" in str(history)
    weights = xfer.export_weights(mixed)
    assert all(w.dtype == np.float32 for w in weights.values()), {
        k: w.dtype for k, w in weights.items()
    }
    # The BN moving statistics trained (bn="train" in stage 2), in float32.
    stats = [k for k in weights if k.endswith(("moving_mean", "moving_variance"))]
    assert stats and all(not np.array_equal(weights[k], start[k]) for k in stats)
    # bfloat16 keeps 8 bits of mantissa: close to the float32 run, not equal to it.
    np.testing.assert_allclose(history.losses(), plain_history.losses(), atol=0.05)
    assert history.losses() != plain_history.losses()
    # Evaluation after the run: the model's own float32, not a policy left behind.
    out = find_adapter(mixed).predict(mixed, data(4)[0])
    assert out.dtype == np.float32


def test_an_unknown_precision_is_refused_naming_the_choices(kit):
    with pytest.raises(ValueError, match="Unknown precision 'float16': expected one of .*bf16"):
        xfer.TransferPipeline(kit.model(), _stages(), precision="float16")


def test_bf16_and_bfloat16_are_one_precision(kit):
    pipe = xfer.TransferPipeline(kit.model(), _stages(), precision="bf16")
    assert pipe.precision == "bfloat16"


def test_xfer_run_precision_bf16_says_so_and_a_resume_must_keep_it(kit, tmp_path, capsys):
    backend = kit.id.partition("-")[0]
    args = ["run", "--backend", backend, "--quick", "--format", "json"]
    args += ["--checkpoint", str(tmp_path / "ckpt")]
    assert main([*args, "--precision", "bf16"]) == 0
    history = json.loads(capsys.readouterr().out)["history"]
    assert history["precision"] == "bfloat16"
    assert all(s["changed"] == [] for s in history["stages"])
    # The checkpoint records it: resuming in float32 would not be the run that started.
    assert main([*args, "--resume"]) == 1
    assert "precision: 'bfloat16' in the checkpoint, 'float32' here" in capsys.readouterr().err


# --- inside the step: a probe layer of each framework records the dtype it computes in ------


def _probe_model(backend: str, seen: list):
    """conv -> BN -> probe -> pool -> dense, written in the framework's own API."""
    if backend == "torch":
        import torch
        from torch import nn

        class Probe(nn.Module):
            def forward(self, x):
                seen.append(str(x.dtype).removeprefix("torch."))
                return x

        torch.manual_seed(0)
        base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Probe(), nn.Flatten())
        return nn.Sequential(base, nn.Linear(4 * 6 * 6, 4))
    if backend == "flax":
        from flax import nnx

        class Net(nnx.Module):
            def __init__(self, rngs):
                self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
                self.bn = nnx.BatchNorm(4, rngs=rngs)
                self.head = nnx.Linear(4, 4, rngs=rngs)

            def __call__(self, x):
                h = self.bn(self.conv(x))
                seen.append(str(h.dtype))
                return self.head(h.mean(axis=(1, 2)))

        return Net(nnx.Rngs(0))
    import keras

    class Probe(keras.layers.Layer):
        def call(self, x):
            seen.append(keras.backend.standardize_dtype(x.dtype))
            return x

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3),
            keras.layers.BatchNormalization(),
            Probe(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ]
    )


def test_the_step_computes_in_bfloat16_and_evaluation_in_float32(kit):
    seen: list[str] = []
    model = _probe_model("keras" if kit.id.startswith("keras") else kit.id, seen)
    pipe = xfer.TransferPipeline(
        model, [xfer.Stage("all", train=S.all(), bn="train", lr=0.01)], batch_size=8,
        precision="bf16", cache="off",
    )  # fmt: skip
    pipe.fit(data(16))  # the step traced (jax) or run (torch engines) sees bfloat16
    assert "bfloat16" in seen, seen  # (the float32 ones: the shape check before training)
    seen.clear()
    find_adapter(model).predict(model, data(4)[0])
    assert seen and set(seen) == {"float32"}, seen
    weights = xfer.export_weights(model)
    assert {str(w.dtype) for w in weights.values()} == {"float32"}
