"""``xfer semantics``: what each framework's own switches really do, measured here and now.

Every cell of the table comes from running a tiny probe on the installed framework
(``backends/<framework>/semantics.py``), never from a list of known facts: if a new
version changes a behaviour, the table changes. Beside each native answer is xfer's
guarantee for the same question, measured the same way through xfer's API.

This module imports no framework; the probes are imported only for the frameworks asked
for. Keras reads ``KERAS_BACKEND`` once per process, so its other engine, when installed,
is measured in a subprocess.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from xfer import _config
from xfer.tables import table

__all__ = ["ROWS", "Row", "measure", "probe", "run_probes", "to_json", "to_markdown", "to_text"]

NA = "n/a"


@dataclasses.dataclass(frozen=True)
class Row:
    """One question of the table: a stable ``id``, the question as users ask it, and what
    xfer guarantees for it (``None`` where xfer changes nothing, e.g. a default value)."""

    id: str
    question: str
    guarantee: str | None


ROWS: tuple[Row, ...] = (
    Row(
        "freeze_stops_bn_stats",
        "Does freezing (requires_grad_(False) / trainable=False / leaving BN out of the "
        "optimizer) stop BN moving statistics from updating in training mode?",
        "xfer.freeze (BN 'frozen'): moving statistics bit-identical after a training step",
    ),
    Row(
        "parent_train_undoes_child_eval",
        "Does the parent's train() undo a child's eval()?",
        "xfer.set_mode('inference') survives model.train() / an outer training=True",
    ),
    Row(
        "outer_training_overrides_inner_false_functional",
        "Keras functional `base(x, training=False)`, base.trainable=True: do an outer "
        "training=True and fit() update the inner BN statistics / activate inner Dropout?",
        "freeze then unfreeze (BN 'affine'): BN statistics bit-identical under fit()",
    ),
    Row(
        "outer_training_overrides_inner_false_subclassed",
        "Keras subclassed call passing training=False explicitly: do an outer "
        "training=True and fit() update the inner BN statistics?",
        "freeze then unfreeze (BN 'affine'): BN statistics bit-identical under fit()",
    ),
    Row(
        "dropout_active_when_frozen",
        "Is Dropout active in training mode inside a frozen layer/model?",
        "set_mode('inference') on Dropout: training-mode output equals inference output",
    ),
    Row(
        "trainable_false_forces_inference",
        "Does the freezing switch put BN in inference mode (moving statistics, no updates)?",
        "xfer.freeze on BN: training-mode output equals inference output, statistics kept",
    ),
    Row(
        "bn_default_momentum",
        "Default BN momentum, in the framework's convention (keeps: fraction of the old "
        "moving statistic kept per batch)",
        None,
    ),
    Row("bn_default_epsilon", "Default BN epsilon", None),
    Row(
        "running_var_estimator",
        "Which batch variance goes into the moving variance: biased or unbiased (n/(n-1))?",
        None,
    ),
    Row(
        "fast_variance",
        "Is the batch variance computed as E[x²]−E[x]² (imprecise for inputs far from 0)?",
        None,
    ),
    Row("bn_batch_counter", "Does BN keep a batch counter (num_batches_tracked)?", None),
    Row(
        "batch_of_one_train_mode",
        "What does a training-mode BN forward with batch size 1 do?",
        "BN 'frozen' runs with batch size 1 and gives the inference output",
    ),
)
_ROW_IDS = tuple(r.id for r in ROWS)


def _plain(value: Any) -> Any:
    # numpy scalars (np.bool_, np.float32) are not JSON; probes may hand them back.
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float):
        value = float(f"{value:.6g}")
    return value


def run_probes(probes: dict[str, Callable[[], dict]]) -> dict[str, dict]:
    """Run each probe, turning its cell into plain JSON data; a probe that raises gives an
    ``"error"`` cell that names the exception instead of stopping the whole table.

    Example:
        >>> run_probes({"bn_default_epsilon": lambda: {"native": 1e-05}})
        {'bn_default_epsilon': {'native': 1e-05, 'xfer': 'n/a', 'detail': ''}}
    """
    cells = {}
    for row, probe in probes.items():
        try:
            cell = probe()
        except Exception as error:  # a broken probe is itself a finding worth showing
            cell = {
                "native": "error",
                "xfer": "error",
                "detail": f"{type(error).__name__}: {error}",
            }
        cells[row] = {
            "native": _plain(cell.get("native", NA)),
            "xfer": _plain(cell.get("xfer", NA)),
            "detail": str(cell.get("detail", "")),
        }
    return cells


def probe(module: Any) -> dict[str, dict]:
    """Run the probes of a backend's ``semantics`` module: its functions named like the
    rows of :data:`ROWS` (a row it has no function for does not apply to it).

    Example:
        >>> import types
        >>> probe(types.SimpleNamespace(bn_default_epsilon=lambda: {"native": 1e-3}))
        {'bn_default_epsilon': {'native': 0.001, 'xfer': 'n/a', 'detail': ''}}
    """
    probes = {row: getattr(module, row) for row in _ROW_IDS if callable(getattr(module, row, None))}
    return run_probes(probes)


def _batch_variances(batch: Any, channel_axis: int) -> tuple[Any, Any, int]:
    x = np.asarray(batch, "float64")
    flat = np.moveaxis(x, channel_axis, -1).reshape(-1, x.shape[channel_axis])
    return flat.var(0), flat.var(0, ddof=1), flat.shape[0]


def frozen_bn_cell(native: tuple[bool, bool], held: tuple[bool, bool], detail: str) -> dict:
    """The ``trainable_false_forces_inference`` cell, from (inference output, moving
    statistics kept) of a BN frozen the framework's way (``native``) and xfer's way (``held``),
    both called in training mode.

    Example:
        >>> frozen_bn_cell((False, True), (True, True), "BN")
        {'native': False, 'xfer': True, 'detail': 'BN'}
    """
    return {"native": all(native), "xfer": all(held), "detail": detail}


def batch_of_one_cell(outcomes: list[str], held: Callable[[], bool], detail: str) -> dict:
    """The ``batch_of_one_train_mode`` cell: what a train-mode BN did with one image at each
    size (``outcomes``), and whether xfer's frozen BN gave its inference output (``held()``;
    an error counts as not held).

    Example:
        >>> batch_of_one_cell(["runs at 1x1"], lambda: 1 / 0, "BN")["xfer"]
        False
    """
    try:
        kept = bool(held())
    except Exception:  # a frozen BN that fails on one image did not hold either
        kept = False
    return {"native": "; ".join(outcomes), "xfer": kept, "detail": detail}


def variance_estimator_cell(
    moving_var: Any, batch: Any, variable: str, channel_axis: int = -1
) -> dict:
    """The ``running_var_estimator`` cell: which formula a BN's moving variance followed,
    given its value after one training batch with a momentum that makes it the batch
    estimate (biased, or unbiased ×n/(n−1), n = N·H·W), and that batch.

    Example:
        >>> import numpy as np
        >>> x = np.arange(8.0).reshape(2, 2, 2, 1)
        >>> variance_estimator_cell(x.reshape(-1, 1).var(0, ddof=1), x, "var")["native"]
        'unbiased (n/(n-1))'
    """
    biased, unbiased, n = _batch_variances(batch, channel_axis)
    err_b, err_u = abs(moving_var - biased).max(), abs(moving_var - unbiased).max()
    return {
        "native": "unbiased (n/(n-1))" if err_u < err_b else "biased",
        "xfer": "n/a",
        "detail": f"{variable} after one batch (n=N*H*W={n}) vs the two formulas: "
        f"|err| unbiased {err_u:.1e}, biased {err_b:.1e}",
    }


def variance_error(moving_var: Any, batch: Any, channel_axis: int = -1) -> float:
    """The relative error of a BN's one-batch variance estimate against the nearer of the
    two exact formulas (``fast_variance``: E[x²]−E[x]² loses digits on offset inputs).

    Example:
        >>> import numpy as np
        >>> x = np.arange(8.0).reshape(2, 2, 2, 1)
        >>> variance_error(x.reshape(-1, 1).var(0), x)
        0.0
    """
    biased, unbiased, _ = _batch_variances(batch, channel_axis)
    err = min(abs(moving_var - biased).max(), abs(moving_var - unbiased).max())
    return float(err / biased.max())


def fast_variance_cell(error: float, more: str = "") -> dict:
    """The ``fast_variance`` cell, from :func:`variance_error` on inputs offset by 1e4.

    Example:
        >>> fast_variance_cell(0.5)["native"]
        True
    """
    return {
        "native": bool(error > 1e-2),
        "xfer": "n/a",
        "detail": f"inputs offset by 1e4: relative error of the batch variance {error:.1e}{more}",
    }


_CHILD = (
    "from xfer.backends.keras import semantics as k\n"
    "from xfer.semantics import probe\n"
    "from xfer.subprocesses import answer\n"
    "answer({'versions': k.versions(), 'cells': probe(k)})\n"
)


def _keras_in_subprocess(engine: str) -> dict:
    from xfer.subprocesses import run_python

    return run_python(_CHILD, env={"KERAS_BACKEND": engine}, timeout=600, what=f"keras-{engine}")


def _column(name: str, measured: dict) -> dict:
    versions = measured["versions"]
    (first, version), *others = versions.items()
    label = f"{first} {version}" + "".join(f" ({k} {v})" for k, v in others)
    cells = {}
    for row in _ROW_IDS:
        cells[row] = measured["cells"].get(
            row, {"native": NA, "xfer": NA, "detail": f"does not apply to {name.split('-')[0]}"}
        )
    return {"id": name, "label": label, "versions": versions, "cells": cells}


def measure(
    backends: Iterable[str] | None = None,
    *,
    other_keras_engine: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the probes of ``backends`` (default: every installed one) and return the report.

    The report is plain JSON data: ``rows`` (id, question, guarantee), ``columns`` (one per
    framework, Keras once per engine: ``torch``, ``keras-jax``, ``keras-torch``, ``flax``,
    each with its ``versions`` and a cell per row: ``native``, ``xfer``, ``detail``) and
    ``notes`` (what was left out, and why).

    Example:
        >>> from xfer import semantics
        >>> report = semantics.measure(["torch"])            # doctest: +SKIP
        >>> report["columns"][0]["cells"]["freeze_stops_bn_stats"]["native"]   # doctest: +SKIP
        False
    """
    wanted = list(backends) if backends else list(_config.BACKENDS)
    for name in wanted:
        _config.validate_backend(name)
    columns, notes = [], []
    for backend in wanted:
        if _config.missing(backend):
            notes.append(f'{backend}: not installed (pip install "xfer[{backend}]"), left out')
            continue
        _config.require(backend)
        module = importlib.import_module(f"xfer.backends.{backend}.semantics")
        name = _config.label(backend)
        if progress is not None:
            progress(f"probing {name}")
        columns.append(_column(name, {"versions": module.versions(), "cells": probe(module)}))
        if backend == "keras" and other_keras_engine:
            other = _config.other_keras_engine()
            if not _config.is_installed(other):
                notes.append(f"keras-{other}: {other} is not installed, left out")
                continue
            if progress is not None:
                progress(f"probing keras-{other} (in a subprocess: one engine per process)")
            try:
                columns.append(_column(f"keras-{other}", _keras_in_subprocess(other)))
            except (RuntimeError, OSError, ValueError) as error:
                notes.append(f"keras-{other}: the subprocess failed ({error}), left out")
    return {
        "xfer": _xfer_version(),
        "rows": [dataclasses.asdict(r) for r in ROWS],
        "columns": columns,
        "notes": notes,
    }


def broken(report: dict) -> list[str]:
    """The ``framework: row`` cells where a measured xfer guarantee did not hold.

    Example:
        >>> broken({"rows": [], "columns": [], "notes": []})
        []
    """
    return [
        f"{column['id']}: {row}"
        for column in report["columns"]
        for row, cell in column["cells"].items()
        if cell.get("xfer") in (False, "error")
    ]


def _xfer_version() -> str:
    import xfer

    return xfer.__version__


def _native(value: Any) -> str:
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value is None:
        return NA
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _xfer(value: Any, unicode: bool = False) -> str:
    if value is True:
        return "✓ held" if unicode else "held"
    if value is False:
        return "✗ BROKEN" if unicode else "BROKEN"
    return _native(value)


def to_json(report: dict) -> str:
    """The report as JSON text (what ``xfer semantics --format json`` prints).

    Example:
        >>> import json
        >>> json.loads(to_json({"rows": [], "columns": [], "notes": []}))["columns"]
        []
    """
    return json.dumps(report, indent=2)


def to_text(report: dict, width: int = 100) -> str:
    """The report for a terminal: the questions, then one table per framework with each
    measurement's detail under its row.

    Example:
        >>> print(to_text(measure(["torch"])))               # doctest: +SKIP
    """
    import textwrap

    ids = max(len(r["id"]) for r in report["rows"])
    indent = " " * (ids + 4)
    lines = ["What each framework's own switches do, measured on this machine.", ""]
    for row in report["rows"]:
        lines += textwrap.wrap(
            row["question"],
            width,
            initial_indent=f"  {row['id']:<{ids}}  ",
            subsequent_indent=indent,
        )
        if row["guarantee"]:
            lines += textwrap.wrap(
                "xfer: " + row["guarantee"], width, initial_indent=indent, subsequent_indent=indent
            )
    for column in report["columns"]:
        lines += ["", f"{column['label']}  [{column['id']}]"]
        cells = [column["cells"][r["id"]] for r in report["rows"]]
        rows = [
            (row["id"], _native(cell["native"]), _xfer(cell["xfer"]))
            for row, cell in zip(report["rows"], cells, strict=True)
        ]
        top, *aligned = table(("question", "native", "xfer"), rows).split("\n")
        lines.append(f"  {top}")
        for line, cell in zip(aligned, cells, strict=True):
            # Each measurement's detail under its row.
            lines.append(f"  {line}")
            lines += textwrap.wrap(
                cell["detail"], width, initial_indent="      ", subsequent_indent="      "
            )
    if report["notes"]:
        lines += ["", *[f"note: {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(report: dict) -> str:
    """The report as Markdown: one table (a row per question, a native and an xfer column
    per framework), what the xfer columns guarantee, and each measurement's detail.

    Example:
        >>> print(to_markdown(measure()))                    # doctest: +SKIP
    """
    columns = report["columns"]
    header = ["#", "question"]
    for column in columns:
        header += [column["label"], "xfer"]
    rows = []
    for i, row in enumerate(report["rows"], 1):
        cells = [str(i), f"{_md(row['question'])} `{row['id']}`"]
        for column in columns:
            cell = column["cells"][row["id"]]
            cells += [_md(_native(cell["native"])), _xfer(cell["xfer"], unicode=True)]
        rows.append(cells)
    lines = [table(header, rows, markdown=True)]
    lines += ["", "What the xfer columns measure (the same probe, run through xfer's API):", ""]
    for i, row in enumerate(report["rows"], 1):
        if row["guarantee"]:
            lines.append(f"- ({i}) `{row['id']}`: {row['guarantee']}")
    for column in columns:
        lines += ["", f"Details, {column['label']} (`{column['id']}`):", ""]
        for row in report["rows"]:
            detail = column["cells"][row["id"]]["detail"]
            if detail:
                lines.append(f"- `{row['id']}`: {detail}")
    if report["notes"]:
        lines += ["", *[f"Note: {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"
