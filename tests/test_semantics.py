"""``xfer semantics``: the measured facts of the installed versions, and every xfer guarantee.

The native facts asserted here are what the pinned versions (torch 2.13, keras 3.15, flax
0.12) do; if a new version changes one, this test names the row that moved and the
documentation's table must be measured again.
"""

from __future__ import annotations

import functools
import json

import pytest

from xfer import semantics
from xfer.cli import main

# What each backend's own switches do on the pinned versions, measured by the probes.
EXPECTED = {
    "torch": {
        "freeze_stops_bn_stats": False,
        "parent_train_undoes_child_eval": True,
        "dropout_active_when_frozen": True,
        "trainable_false_forces_inference": False,
        "bn_default_momentum": "0.1 (keeps 0.9)",
        "bn_default_epsilon": 1e-5,
        "running_var_estimator": "unbiased (n/(n-1))",
        "fast_variance": False,
        "bn_batch_counter": True,
    },
    "keras": {
        "freeze_stops_bn_stats": True,
        "parent_train_undoes_child_eval": "n/a",
        "outer_training_overrides_inner_false_functional": True,
        "outer_training_overrides_inner_false_subclassed": False,
        "dropout_active_when_frozen": True,
        "trainable_false_forces_inference": True,
        "bn_default_momentum": "0.99 (keeps 0.99)",
        "bn_default_epsilon": 1e-3,
        "running_var_estimator": "biased",
        "bn_batch_counter": False,
    },
    "flax": {
        "freeze_stops_bn_stats": False,
        "parent_train_undoes_child_eval": True,
        "dropout_active_when_frozen": True,
        "trainable_false_forces_inference": False,
        "bn_default_momentum": "0.99 (keeps 0.99)",
        "bn_default_epsilon": 1e-5,
        "running_var_estimator": "biased",
        "fast_variance": True,
        "bn_batch_counter": False,
    },
}
# Keras computes the variance as E[x²]−E[x]² on the torch engine only.
FAST_VARIANCE = {"keras-jax": False, "keras-torch": True}
KERAS_ONLY = (
    "outer_training_overrides_inner_false_functional",
    "outer_training_overrides_inner_false_subclassed",
)


@functools.cache
def _report(backend: str) -> dict:
    # One measurement per backend and process; the other Keras engine needs a subprocess,
    # which the CLI test below does not ask for either.
    return semantics.measure([backend], other_keras_engine=False)


def _column(kit) -> dict:
    backend = kit.id.partition("-")[0]
    (column,) = _report(backend)["columns"]
    assert column["id"] == kit.id
    return column


def test_native_facts_are_measured_as_documented(kit):
    cells = _column(kit)["cells"]
    backend = kit.id.partition("-")[0]
    expected = dict(EXPECTED[backend])
    if backend == "keras":
        expected["fast_variance"] = FAST_VARIANCE[kit.id]
    else:
        expected.update(dict.fromkeys(KERAS_ONLY, "n/a"))
    measured = {row: cells[row]["native"] for row in expected}
    assert measured == expected, {row: cells[row] for row in expected}


def test_batch_of_one_is_described(kit):
    native = _column(kit)["cells"]["batch_of_one_train_mode"]["native"]
    if kit.id == "torch":
        assert native.startswith("ValueError at 1x1") and "runs at 3x3" in native
    else:
        assert native.startswith("runs at 1x1 (output = beta)")


def test_every_xfer_guarantee_holds(kit):
    cells = _column(kit)["cells"]
    rows = {r.id: r for r in semantics.ROWS}
    for row_id, cell in cells.items():
        applies = rows[row_id].guarantee is not None and not (
            row_id in KERAS_ONLY and not kit.id.startswith("keras")
        )
        assert cell["xfer"] is True if applies else cell["xfer"] == "n/a", (row_id, cell)


def test_report_has_a_cell_per_row_and_round_trips_as_json(kit):
    report = _report(kit.id.partition("-")[0])
    assert [r["id"] for r in report["rows"]] == [r.id for r in semantics.ROWS]
    assert set(report["columns"][0]["cells"]) == {r.id for r in semantics.ROWS}
    assert json.loads(semantics.to_json(report)) == report


def test_markdown_has_a_row_per_question_and_columns_per_framework(kit):
    report = _report(kit.id.partition("-")[0])
    text = semantics.to_markdown(report)
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header, body = table[0], table[1:]
    assert len(body) == len(semantics.ROWS)
    label = report["columns"][0]["label"]
    assert f"| {label} | xfer |" in header
    for row, line in zip(semantics.ROWS, body, strict=True):
        assert f"`{row.id}`" in line and line.count(" | ") == header.count(" | ")


def test_text_lists_each_framework_with_its_versions(kit):
    report = _report(kit.id.partition("-")[0])
    text = semantics.to_text(report)
    column = report["columns"][0]
    assert f"{column['label']}  [{column['id']}]" in text
    assert all(row.id in text for row in semantics.ROWS)
    assert "BROKEN" not in text


def test_rendering_shows_missing_frameworks_and_errors():
    report = {
        "rows": [
            {"id": "a", "question": "Q? | pipe", "guarantee": "G"},
            {"id": "b", "question": "R?", "guarantee": None},
        ],
        "columns": [
            {
                "id": "x",
                "label": "x 1.0",
                "versions": {"x": "1.0"},
                "cells": {
                    "a": {"native": True, "xfer": False, "detail": "d"},
                    "b": {"native": 0.5, "xfer": "n/a", "detail": ""},
                },
            }
        ],
        "notes": ["flax: not installed"],
    }
    markdown = semantics.to_markdown(report)
    assert "| 1 | Q? \\| pipe `a` | yes | ✗ BROKEN |" in markdown
    assert "| 2 | R? `b` | 0.5 | n/a |" in markdown
    assert "Note: flax: not installed" in markdown
    assert "BROKEN" in semantics.to_text(report)


def test_a_failing_probe_becomes_an_error_cell():
    def broken():
        raise RuntimeError("boom")

    cells = semantics.run_probes({"a": broken, "b": lambda: {"native": True, "xfer": True}})
    assert cells["a"]["native"] == "error" and "boom" in cells["a"]["detail"]
    assert cells["b"] == {"native": True, "xfer": True, "detail": ""}


def test_cli_prints_json_for_one_backend(kit, capsys, monkeypatch):
    backend = kit.id.partition("-")[0]
    # The CLI's own measurement, without the second Keras engine's subprocess.
    monkeypatch.setattr(
        semantics, "measure", lambda backends, **kw: _report(backends[0]) if backends else None
    )
    assert main(["semantics", "--backend", backend, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["columns"][0]["id"] == kit.id
    assert main(["semantics", "--backend", backend, "--format", "markdown"]) == 0
    assert capsys.readouterr().out.startswith("| # | question |")


@pytest.mark.backends("keras-jax", "keras-torch")
def test_keras_other_engine_is_measured_in_a_subprocess_of_the_installed_xfer(kit):
    # Run from a clean clone, the working directory holds the source tree, which must not
    # shadow the installed package in the child process.
    from xfer import _config, semantics

    other = "torch" if kit.id == "keras-jax" else "jax"
    if not _config.is_installed(other):
        pytest.skip(f"{other} is not installed in this session")
    measured = semantics._keras_in_subprocess(other)
    assert measured["versions"]["keras"]
    assert measured["cells"]["trainable_false_forces_inference"]["native"] is True
    assert measured["cells"]["freeze_stops_bn_stats"]["xfer"] is True
