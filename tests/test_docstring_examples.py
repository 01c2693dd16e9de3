"""Every docstring example of xfer runs, as a user would paste it (doctest on each module).

The ``doctests`` nox session, where every framework is installed: examples name the
framework they show (``build_model("torch")``). Examples that need minutes of training, a
GPU or a subprocess are marked ``+SKIP``; every other one must print what it shows.
"""

from __future__ import annotations

import doctest
import importlib
import os
import pkgutil

import pytest
from conftest import BACKENDS

import xfer
from xfer import _config

HERE = {_config.flavour(label).backend for label in BACKENDS}
NOT_HERE = tuple(f"xfer.backends.{b}" for b in _config.BACKENDS if b not in HERE)
NOT_A_LIBRARY = ("xfer.__main__",)  # importing it runs the CLI
# Modules whose examples need a library of an extra that only their session installs:
# xfer.integrations (tests-external), xfer.export (the onnx extra: nox -s export).
INTEGRATIONS = {"xfer.integrations.lightning": "lightning", "xfer.export": "onnxruntime"}

pytestmark = pytest.mark.skipif(
    os.environ.get("XFER_DOCTESTS") != "1", reason="the examples run in `nox -s doctests`"
)


def _modules() -> list[str]:
    names = [m.name for m in pkgutil.walk_packages(xfer.__path__, "xfer.")]
    return sorted(n for n in names if n not in NOT_A_LIBRARY and not n.startswith(NOT_HERE))


@pytest.mark.parametrize("name", _modules())
def test_the_examples_run(name):
    if name in INTEGRATIONS:
        pytest.importorskip(INTEGRATIONS[name], reason=f"{name} needs {INTEGRATIONS[name]}")
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert failed == 0, f"{failed} of {attempted} examples of {name} failed (see above)"
