"""The ``kit`` fixture runs the conformance suite once per backend available here.

``XFER_TEST_BACKENDS`` (comma separated: torch, keras-jax, keras-torch, flax) picks them;
each nox session sets it. Keras reads ``KERAS_BACKEND`` once per process, so one process
tests Keras on one engine only.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Keras writes ~/.keras unless KERAS_HOME points elsewhere.
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="xfer-keras-home-"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _available() -> list[str]:
    wanted = os.environ.get("XFER_TEST_BACKENDS")
    if wanted:
        return [b.strip() for b in wanted.split(",") if b.strip()]
    found = []
    if importlib.util.find_spec("torch"):
        found.append("torch")
    if importlib.util.find_spec("keras"):
        engine = os.environ.setdefault(
            "KERAS_BACKEND", "jax" if importlib.util.find_spec("jax") else "torch"
        )
        found.append(f"keras-{engine}")
    if importlib.util.find_spec("flax"):
        found.append("flax")
    return found


BACKENDS = _available()
for _b in BACKENDS:
    if _b.startswith("keras-"):
        os.environ["KERAS_BACKEND"] = _b.removeprefix("keras-")


def pytest_generate_tests(metafunc):
    if "kit" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        ids = [b for b in BACKENDS if marker is None or b in marker.args]
        metafunc.parametrize("kit_id", ids, ids=ids)


@pytest.fixture
def kit(kit_id):
    from kits import load_kit

    return load_kit(kit_id)


@pytest.fixture(autouse=True)
def _reset_backend():
    import xfer._config as config

    saved = config._current
    yield
    config._current = saved
