"""Parity checks: from one set of neutral weights, what each backend computes.

``run_checks(kit)`` loads the same neutral weights into the backend's reference model and
records, with the framework's own loops (tests/kits): inference logits; one training-mode
forward (logits and updated BN statistics); three full-batch SGD steps in training mode;
three Adam steps with BN "affine"; one SGD step under each BN policy; BN statistics
recalibrated by xfer.recalibrate_bn; and xfer's own
two-stage pipeline (loss curve, validation loss, final weights). BN conventions are
translated so that every backend should give the same numbers: torch's running variance is
updated with the unbiased batch variance, the others with the biased one (DESIGN §5).

Also a numpy float64 reference of the model's forward pass, and a command line used by the
cross-backend test (one process per backend, since Keras reads KERAS_BACKEND once):

    python tests/parity.py KIT_ID OUT.npz    # KIT_ID: torch, flax, keras-jax, keras-torch
"""

from __future__ import annotations

import os
import sys

import numpy as np

NUM_CLASSES, CHANNELS, WIDTH = 4, 3, 8
KEEP = 0.9  # BN momentum, Keras/Flax convention (fraction of the old statistic kept)
EPSILON = 1e-3
BN_UNITS = ("base.block1.bn", "base.block2.bn")
STATS = ("moving_mean", "moving_variance")
POLICIES = ("frozen", "affine", "adapt", "train")
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "parity.npz")


def reference_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Neutral weights for small_cnn(4, 3, width=8), with non-trivial BN statistics."""
    rng = np.random.default_rng(seed)
    weights = {}
    for block, c_in in (("block1", CHANNELS), ("block2", WIDTH)):
        prefix = f"base.{block}"
        weights[f"{prefix}.conv.kernel"] = rng.normal(0, 0.4, (3, 3, c_in, WIDTH))
        weights[f"{prefix}.conv.bias"] = rng.normal(0, 0.1, WIDTH)
        weights[f"{prefix}.bn.gamma"] = 1 + rng.normal(0, 0.1, WIDTH)
        weights[f"{prefix}.bn.beta"] = rng.normal(0, 0.1, WIDTH)
        weights[f"{prefix}.bn.moving_mean"] = rng.normal(0, 0.2, WIDTH)
        weights[f"{prefix}.bn.moving_variance"] = 1 + np.abs(rng.normal(0, 0.3, WIDTH))
    weights["head.dense.kernel"] = rng.normal(0, 0.4, (WIDTH, NUM_CLASSES))
    weights["head.dense.bias"] = rng.normal(0, 0.1, NUM_CLASSES)
    return {k: v.astype("float32") for k, v in weights.items()}


def batch(n: int = 8, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.5, 1.0, (n, 8, 8, CHANNELS)).astype("float32")
    return x, (np.arange(n) % NUM_CLASSES).astype("int64")


def numpy_forward(w: dict, x: np.ndarray, train: bool) -> tuple[np.ndarray, dict]:
    """The reference model in float64: logits, and per BN unit the (mean, biased var) it used."""
    h, used = x.astype("float64"), {}
    for block in ("block1", "block2"):
        prefix = f"base.{block}"
        kernel = w[f"{prefix}.conv.kernel"].astype("float64")
        padded = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        size = h.shape[1]
        h = (
            sum(
                padded[:, i : i + size, j : j + size, :] @ kernel[i, j]
                for i in range(3)
                for j in range(3)
            )
            + w[f"{prefix}.conv.bias"]
        )
        bn = f"{prefix}.bn"
        if train:
            mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
        else:
            mean, var = w[f"{bn}.moving_mean"], w[f"{bn}.moving_variance"]
        used[bn] = (mean, var)
        h = (h - mean) / np.sqrt(var + EPSILON) * w[f"{bn}.gamma"] + w[f"{bn}.beta"]
        h = np.maximum(h, 0.0)
    features = h.mean(axis=(1, 2))
    return features @ w["head.dense.kernel"] + w["head.dense.bias"], used


def keras_convention(kit, before: dict, after: dict, n: int) -> dict:
    """``after`` with torch's unbiased running-variance update re-expressed as the biased one.

    Exact for one update: new = k*old + (1-k)*unbiased, unbiased = biased*n/(n-1).
    Statistics that did not change (BN pinned to inference) are left as they are.
    """
    if not kit.running_var_unbiased:
        return after
    out = dict(after)
    for unit in BN_UNITS:
        key = f"{unit}.moving_variance"
        old, new = before[key].astype("float64"), after[key].astype("float64")
        if np.array_equal(old, new):  # statistics frozen: no update to translate
            continue
        unbiased = (new - KEEP * old) / (1 - KEEP)
        out[key] = (KEEP * old + (1 - KEEP) * unbiased * (n - 1) / n).astype("float32")
    return out


def _elements_per_channel(x: np.ndarray) -> int:
    return x.shape[0] * x.shape[1] * x.shape[2]  # N*H*W: every conv keeps the image size


def run_checks(kit) -> dict[str, np.ndarray]:
    """Every parity quantity of this backend, keyed ``check.tensor``."""
    import xfer
    from xfer import select as S

    weights = reference_weights()
    x, y = batch()
    n = _elements_per_channel(x)

    def fresh():
        model = kit.model(dropout=0.0)
        xfer.import_weights(model, weights)
        return model

    out = {"inference.logits": kit.predict(fresh(), x)}

    model = fresh()
    out["train_forward.logits"] = kit.forward_train(model, x)
    after = keras_convention(kit, weights, xfer.export_weights(model), n)
    out.update({f"train_forward.{u}.{s}": after[f"{u}.{s}"] for u in BN_UNITS for s in STATS})

    model = fresh()
    kit.fit(model, x, y, epochs=3, batch_size=len(x), lr=0.05, optimizer="sgd")
    # After several training-mode steps torch's running variance cannot be translated
    # exactly, so this check compares parameters (BN uses batch statistics in the steps).
    out.update(
        {f"sgd.{k}": v for k, v in xfer.export_weights(model).items() if not k.endswith(STATS)}
    )

    model = fresh()
    # BN on moving statistics: conv biases then get real gradients. In training mode their
    # gradient is zero up to rounding, and Adam's first steps would amplify the rounding.
    xfer.set_bn(model, "affine")
    kit.fit(model, x, y, epochs=3, batch_size=len(x), lr=0.01, optimizer="adam")
    out.update({f"adam.{k}": v for k, v in xfer.export_weights(model).items()})

    for policy in POLICIES:
        model = fresh()
        xfer.freeze(model, S.path("base.**"))
        xfer.set_bn(model, policy, S.path("base.**"))
        kit.fit(model, x, y, epochs=1, batch_size=len(x), lr=0.05, optimizer="sgd")
        after = keras_convention(kit, weights, xfer.export_weights(model), n)
        out.update({f"policy_{policy}.{k}": v for k, v in after.items()})
    out.update(_recalibration_checks(fresh(), kit))
    out.update(_pipeline_checks(kit, weights))
    out.update(_resnet_checks(kit))
    return out


def _recalibration_checks(model, kit) -> dict[str, np.ndarray]:
    """xfer.recalibrate_bn on a model whose BN is pinned to inference: three equal batches
    of shifted images. Torch's unbiased variance is re-expressed as the biased one (exact
    for equal batches: the average of n/(n-1) x biased is n/(n-1) x the average). Recorded
    in the units that matter to the normalisation, against the float64 reference: the
    mean's offset in standard deviations, the variance as a ratio (a variance near 30 is
    only resolved to 2e-6 in float32)."""
    import xfer

    xfer.set_bn(model, "frozen")
    rng = np.random.default_rng(7)
    x = rng.normal(1.5, 2.0, (24, 8, 8, CHANNELS)).astype("float32")
    xfer.recalibrate_bn(model, x, batch_size=8)
    after = xfer.export_weights(model)
    n = _elements_per_channel(x[:8])
    correction = (n - 1) / n if kit.running_var_unbiased else 1.0
    used = [numpy_forward(reference_weights(), x[i : i + 8], train=True)[1] for i in (0, 8, 16)]
    out = {}
    for unit in BN_UNITS:
        mean = np.mean([u[unit][0] for u in used], axis=0)
        var = np.mean([u[unit][1] for u in used], axis=0)
        found_var = after[f"{unit}.moving_variance"].astype("float64") * correction
        out[f"recalibrate.{unit}.mean_offset"] = (after[f"{unit}.moving_mean"] - mean) / np.sqrt(
            var
        )
        out[f"recalibrate.{unit}.variance_ratio"] = found_var / var
    return out


def _pipeline_checks(kit, weights: dict) -> dict[str, np.ndarray]:
    """xfer's own two-stage pipeline from the same weights and data order: its loss curve,
    validation loss and final weights."""
    import xfer
    from xfer import select as S

    x, y = batch(32, seed=2)
    val = batch(16, seed=3)
    model = kit.model(dropout=0.0)
    xfer.import_weights(model, weights)
    stages = [
        xfer.Stage(
            "head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05, epochs=2
        ),
        xfer.Stage("finetune", train=S.all(), bn="affine", lr=0.01, epochs=2),
        # Discriminative learning rates: the base ten times slower than the head.
        xfer.Stage(
            "groups", train=S.all(), bn="affine", lr=0.01, lr_groups=((S.path("base.**"), 0.001),)
        ),
    ]
    history = xfer.TransferPipeline(model, stages, optimizer="momentum", batch_size=8).fit(
        (x, y), val
    )
    out = {
        "pipeline.losses": np.array(history.losses()),
        "pipeline.val_loss": np.array([e.val_loss for s in history.stages for e in s.epochs]),
    }
    out.update({f"pipeline.{k}": v for k, v in xfer.export_weights(model).items()})
    return out


def _resnet_checks(kit) -> dict[str, np.ndarray]:
    """The benchmark's model, xfer.models.resnet (18, narrow), through both usual stages
    from the same neutral weights: the head on cached features of the frozen base, then
    everything with BN on moving statistics. Its BN statistics are set away from 0/1 so
    that their use shows."""
    import xfer
    from xfer import select as S

    model = xfer.models.resnet(
        18, NUM_CLASSES, CHANNELS, width=4, seed=0, backend=kit.id.split("-")[0]
    )
    rng = np.random.default_rng(5)
    weights = {}
    for key, value in sorted(xfer.export_weights(model).items()):
        if key.endswith(("moving_variance", "gamma")):
            weights[key] = rng.uniform(0.5, 1.5, value.shape).astype("float32")
        elif key.endswith(("moving_mean", "beta")):
            weights[key] = rng.uniform(-0.5, 0.5, value.shape).astype("float32")
        else:
            fan_in = int(np.prod(value.shape[:-1])) if value.ndim > 1 else 1
            weights[key] = rng.normal(0, fan_in**-0.5, value.shape).astype("float32")
    xfer.import_weights(model, weights)
    # 16x16 images: every stride-2 layer halves an even size (where padding conventions
    # differ between frameworks) down to 1x1.
    x = rng.normal(0.5, 1.0, (16, 16, 16, CHANNELS)).astype("float32")
    y = (np.arange(16) % NUM_CLASSES).astype("int64")
    stages = [
        xfer.Stage(
            "head", train=S.path("head.**"), bn="frozen", mode="inference", lr=0.05, epochs=2
        ),
        xfer.Stage("finetune", train=S.all(), bn="affine", lr=0.01, epochs=1),
    ]
    history = xfer.TransferPipeline(model, stages, optimizer="momentum", batch_size=8).fit((x, y))
    out = {"resnet.losses": np.array(history.losses())}
    out.update({f"resnet.{k}": v for k, v in xfer.export_weights(model).items()})
    return out


def check_group(key: str) -> str:
    return key.partition(".")[0]


def tolerance(key: str) -> float:
    """Absolute tolerance per check: float32 rounding, grown by the steps taken."""
    return {"inference": 2e-6, "train_forward": 2e-6, "recalibrate": 1e-6}.get(
        check_group(key), 1e-5
    )


def main(argv: list[str]) -> None:
    kit_id, out_path = argv
    if kit_id.startswith("keras-"):
        os.environ["KERAS_BACKEND"] = kit_id.removeprefix("keras-")
    if kit_id in ("torch", "keras-torch"):
        # torch's own CPU convolutions, not oneDNN's: on an AVX2-only EPYC under load, Keras
        # on torch's resnet check got a layer2.0.downsample kernel 2e-4 to 6e-4 off in 3 of
        # 10 runs with oneDNN (at 5f91ca6 as at 5bd66c2), and in 0 of 10 without it. The
        # kernel's nondeterminism is torch's; this check compares xfer's logic.
        import torch

        torch.backends.mkldnn.enabled = False
    from kits import load_kit  # run as a script: its directory, tests/, is on sys.path

    np.savez(out_path, **run_checks(load_kit(kit_id)))


if __name__ == "__main__":
    main(sys.argv[1:])
