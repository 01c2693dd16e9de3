"""Shared checks of the external-model tests: xfer's guarantees on models and training
loops that nobody here wrote (Hugging Face transformers, Lightning, torchvision, timm).

These files run in their own nox sessions (``tests-external``, ``tests-torchvision``),
which install those libraries; the per-framework sessions ``--ignore`` this folder, and a
plain ``pytest`` without the libraries skips each file with the package it needs.
Models are built from configs with random weights; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest

import xfer
from xfer import select as S

torch = pytest.importorskip("torch")


def bn_stats(model) -> dict[str, np.ndarray]:
    """Every BN running statistic of ``model``, copied (buffers ending in running_*)."""
    return {
        name: buffer.detach().cpu().numpy().copy()
        for name, buffer in model.named_buffers()
        if name.rsplit(".", 1)[-1] in ("running_mean", "running_var")
    }


def assert_same(before: dict, after: dict, keys=None) -> None:
    """Bit-identical arrays under ``keys`` (default: every key of ``before``)."""
    keys = list(before) if keys is None else list(keys)
    assert keys, "nothing to compare"
    changed = [k for k in keys if not np.array_equal(before[k], after[k])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:4]}"


def assert_changed(before: dict, after: dict, keys) -> None:
    keys = list(keys)
    assert keys, "nothing to compare"
    same = [k for k in keys if np.array_equal(before[k], after[k])]
    assert not same, f"{len(same)} tensors did not train, e.g. {same[:4]}"


def assert_paths_are_named_modules(model) -> None:
    """xfer's unit paths are exactly torch's ``named_modules()`` names (root aside)."""
    paths = [row.path for row in xfer.summary(model, print_fn=None).rows]
    assert paths == [name for name, _ in model.named_modules() if name]


def assert_glob_selects_subtree(model, prefix: str) -> None:
    """``S.path(prefix + ".**")`` picks ``prefix`` and every module below it, no other."""
    units = xfer._adapter.find_adapter(model).units(model)
    chosen = S.path(f"{prefix}.**").paths(units)
    expected = {n for n, _ in model.named_modules() if n == prefix or n.startswith(prefix + ".")}
    assert len(expected) > 1 and chosen == expected


def assert_deterministic_in_train_mode(model, forward, x) -> None:
    """Under ``model.train()`` two forward passes agree with each other and with eval mode:
    every Dropout/drop-path/BN that ``forward`` goes through is pinned to inference."""
    with torch.no_grad():
        model.train()
        first, second = forward(x), forward(x)
        model.eval()
        reference = forward(x)
        model.train()
    assert torch.equal(first, second) and torch.equal(first, reference)


def assert_random_in_train_mode(model, forward, x) -> None:
    """The native baseline of the check above: without pins, train mode is random."""
    with torch.no_grad():
        model.train()
        first, second = forward(x), forward(x)
    assert not torch.equal(first, second)


def images(n: int = 4, size: int = 32, seed: int = 0):
    """``n`` random NCHW images and labels in 0..2."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=generator)
    return x, torch.arange(n) % 3
