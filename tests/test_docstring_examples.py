"""The docstring examples of xfer's framework-free modules run (as a user would paste them).

Examples that need a model are marked ``+SKIP``; the rest must print what they show.
"""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "xfer.data",
    "xfer.files",
    "xfer.fingerprint",
    "xfer.pipeline.interrupt",
    "xfer.pipeline.history",
    "xfer.pipeline.presets",
    "xfer.report",
    "xfer.subprocesses",
    "xfer.checkpoint",
    "xfer._checks",
]


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_run(name):
    module = importlib.import_module(name)
    failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert attempted > 0, f"{name} has no example that runs"
    assert failed == 0, f"{failed} of {attempted} examples of {name} failed (see above)"
