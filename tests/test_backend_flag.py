"""The backend flag, and that importing xfer imports no framework."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import xfer
from xfer import _config

FRAMEWORKS = ("torch", "keras", "jax", "flax", "tensorflow", "optax", "lightning", "transformers")


def test_import_xfer_imports_no_framework():
    code = (
        "import sys, xfer, xfer.select, xfer.state, xfer.summary, xfer.audit, xfer.integrations;"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(ValueError, match="expected one of torch, keras, flax"):
        xfer.set_backend("tensorflow")


def test_missing_framework_names_the_extra(monkeypatch):
    monkeypatch.setattr(_config, "is_installed", lambda package: package != "flax")
    with pytest.raises(ImportError, match=r'pip install "xfer\[flax\]"'):
        xfer.set_backend("flax")


def test_env_flag_is_read_and_validated(monkeypatch):
    monkeypatch.setattr(_config, "_current", None)
    monkeypatch.setenv("XFER_BACKEND", "nope")
    with pytest.raises(ValueError, match="Unknown xfer backend 'nope'"):
        xfer.get_backend()


def test_backend_context_restores_the_previous_backend(monkeypatch):
    monkeypatch.setattr(_config, "is_installed", lambda package: True)
    monkeypatch.setattr(_config, "_current", "flax")
    with xfer.backend_context("torch") as name:
        assert name == xfer.get_backend() == "torch"
    assert xfer.get_backend() == "flax"


@pytest.mark.skipif(not _config.is_installed("keras"), reason="keras not installed")
def test_keras_engine_is_chosen_once_and_said(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(XFER_BACKEND="keras", KERAS_HOME=str(tmp_path))
    code = "import os, xfer; xfer.set_backend('keras'); xfer.set_backend('keras'); print(os.environ['KERAS_BACKEND'])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    engine = "jax" if _config.is_installed("jax") else "torch"
    assert out.stdout.strip() == engine
    assert out.stderr.count("KERAS_BACKEND is not set") == 1


def test_unsupported_model_is_a_type_error_naming_supported_types():
    with pytest.raises(TypeError, match="expected a keras.Layer/keras.Model, a torch.nn.Module"):
        xfer.freeze([1, 2, 3])


def test_an_unknown_backend_for_a_reference_model_lists_the_backends():
    with pytest.raises(ValueError, match="Unknown xfer backend 'tensorflow'.*torch, keras, flax"):
        xfer.models.small_cnn(4, backend="tensorflow")


@pytest.mark.skipif(not _config.is_installed("keras"), reason="keras not installed")
def test_keras_on_the_tensorflow_engine_is_refused_with_the_engines_to_set(tmp_path):
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "KERAS_HOME": str(tmp_path)}
    code = "import xfer; xfer.set_backend('keras')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode != 0
    assert "xfer supports the jax and torch engines of Keras" in out.stderr
    assert "set KERAS_BACKEND=jax or torch" in out.stderr
    assert "keras/src" not in out.stderr  # refused before Keras's own import fails


def test_empty_and_object_images_are_refused_before_training():
    import numpy as np

    from xfer import data

    empty = (np.zeros((0, 8, 8, 3), "float32"), np.zeros((0,), "int64"))
    with pytest.raises(ValueError, match="train: no examples"):
        data.check(empty, name="train", num_classes=4, in_channels=3)
    objects = (np.empty((2, 8, 8, 3), object), np.array([0, 1]))
    with pytest.raises(TypeError, match="train: images must be numbers.*got object"):
        data.check(objects, name="train", num_classes=4, in_channels=3)
    with pytest.raises(TypeError, match="train: images must be numbers.*got object"):
        data.check([objects], name="train", num_classes=4, in_channels=3)
