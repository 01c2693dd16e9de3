"""The ``kit`` fixture runs the conformance suite once per backend available here.

``XFER_TEST_BACKENDS`` (comma separated: torch, keras-jax, keras-torch, flax) picks them;
each nox session sets it. Keras reads ``KERAS_BACKEND`` once per process, so one process
tests Keras on one engine only.
"""

from __future__ import annotations

import os
import signal
import tempfile

import pytest

from xfer._config import REGISTRY, is_installed, keras_engine

# Keras writes ~/.keras unless KERAS_HOME points elsewhere.
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="xfer-keras-home-"))
# xfer's cache (JAX's compiled programs: xfer.compile_cache) goes to ~/.cache/xfer unless
# XFER_CACHE points elsewhere; the tests' child processes share this one.
os.environ.setdefault("XFER_CACHE", tempfile.mkdtemp(prefix="xfer-cache-"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Started in the background by a shell without job control (`nohup ... &`), the tests
# inherit SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C
# tests need what a terminal gives (their child processes then inherit the default too).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _available() -> list[str]:
    wanted = os.environ.get("XFER_TEST_BACKENDS")
    if wanted:
        return [b.strip() for b in wanted.split(",") if b.strip()]
    engine = keras_engine()  # Keras runs on one engine per process
    return [
        f.label
        for f in REGISTRY
        if all(is_installed(p) for p in f.packages) and f.keras_engine in (None, engine)
    ]


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
