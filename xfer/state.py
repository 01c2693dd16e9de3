"""The state operations: freeze, unfreeze, set_mode, set_bn, snapshot, export/import.

Each operation is all-or-nothing: it validates the whole request against the whole model
(selector, mode, policy, every value of a saved state), plans every unit's change, then
applies the plan through the model's adapter. Bad input leaves the model unchanged, and
if applying still fails midway (a framework error, an interrupt) the state from before
the call is put back before the error propagates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from xfer import select as S
from xfer._adapter import MODES, Adapter, Unit, find_adapter
from xfer.policy import BNPolicy

STATE_FORMAT = 1


class SelectionError(ValueError):
    """A selector chose no unit that the operation can act on."""


def resolve(model: Any, where: S.Selector) -> tuple[Adapter, list[Unit], list[Unit]]:
    """The adapter, all units and the selected units of ``model``; an error if none."""
    adapter = find_adapter(model)
    where = S.check_selector(where)
    units = adapter.units(model)
    selected = where(units)
    if not selected:
        raise SelectionError(
            f"Selector {where!r} matches no unit of this {type(model).__name__}. "
            f"Some paths that exist: {_some_paths(units)}."
        )
    return adapter, units, selected


def _some_paths(units: Sequence[Unit], limit: int = 8) -> str:
    names = [u.path for u in units[:limit]]
    more = f", ... ({len(units)} units)" if len(units) > limit else ""
    return ", ".join(names) + more if names else "(the model has no units)"


def _with_params(selected: list[Unit], where: S.Selector, op: str) -> list[Unit]:
    owning = [u for u in selected if u.n_params > 0]
    if not owning:
        raise SelectionError(
            f"{op}: selector {where!r} matches only units without parameters of their own "
            f"({_some_paths(selected, 4)}). Operations act on exactly the units selected; "
            "to include everything inside a block, select it with S.path('block.**')."
        )
    return owning


def check_mode(mode: object) -> str:
    """``mode`` itself if it is one of ``"inference"``, ``"train"``, ``"inherit"``; a
    ``ValueError`` that explains them if not.

    Example:
        >>> from xfer.state import check_mode
        >>> check_mode("inference")
        'inference'
    """
    if mode not in MODES:
        raise ValueError(
            f"Unknown mode {mode!r}: expected one of {', '.join(MODES)} "
            "(inference = Dropout off and BN on moving statistics, whatever the framework's "
            "own train()/fit()/training=True says; inherit = follow the framework)."
        )
    return mode


def freeze(
    model: Any, where: S.Selector | None = None, *, bn: str | BNPolicy | None = "frozen"
) -> None:
    """Stop the optimizer from updating the selected units' parameters.

    Selected BatchNorm units also get the policy ``bn`` (default ``"frozen"``: affine
    frozen and moving statistics frozen, as Keras's ``trainable=False``); pass
    ``bn=None`` to freeze their affine only and leave their statistics policy alone.

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> xfer.freeze(model, S.path("base.**"))          # doctest: +SKIP
        >>> xfer.freeze(model, S.all(), bn="adapt")         # doctest: +SKIP
    """
    where = S.all() if where is None else where
    policy = BNPolicy.of(bn) if bn is not None else None
    adapter, units, selected = resolve(model, where)
    plan = {u.path: (u, False, None) for u in _with_params(selected, where, "freeze")}
    if policy is not None:
        plan.update({u.path: (u, policy.trainable, policy.mode) for u in selected if u.is_bn})
    _apply(adapter, units, list(plan.values()))


def unfreeze(model: Any, where: S.Selector | None = None) -> None:
    """Let the optimizer update the selected units' parameters.

    BatchNorm units get a trainable affine and keep their statistics policy, so
    ``freeze`` then ``unfreeze`` gives BN ``"affine"`` (the Keras guide's fine-tuning state).

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> xfer.unfreeze(model, S.top(2))                  # doctest: +SKIP
    """
    where = S.all() if where is None else where
    adapter, units, selected = resolve(model, where)
    _apply(adapter, units, [(u, True, None) for u in _with_params(selected, where, "unfreeze")])


def set_mode(model: Any, mode: str, where: S.Selector | None = None) -> None:
    """Pin the selected units to ``"inference"`` or ``"train"``, or release them (``"inherit"``).

    A pin survives the framework's own switches: PyTorch ``model.train()``, Keras
    ``fit()`` or an outer ``training=True``, Flax NNX ``model.train()``.

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> xfer.set_mode(model, "inference", S.path("base.**"))   # doctest: +SKIP
    """
    mode = check_mode(mode)
    where = S.all() if where is None else where
    adapter, units, selected = resolve(model, where)
    _apply(adapter, units, [(u, None, mode) for u in selected])


def set_bn(model: Any, policy: str | BNPolicy, where: S.Selector | None = None) -> None:
    """Give the selected BatchNorm units a policy: ``"frozen"``, ``"affine"``, ``"adapt"``,
    ``"train"`` or a ``BNPolicy``. Non-BN units in the selection are left alone.

    Example:
        >>> import xfer
        >>> xfer.set_bn(model, "affine")                   # doctest: +SKIP
        >>> xfer.set_bn(model, xfer.BNPolicy(affine="frozen", stats="update"))  # doctest: +SKIP
    """
    policy = BNPolicy.of(policy)
    where = S.bn() if where is None else where
    adapter, units, selected = resolve(model, where)
    bns = [u for u in selected if u.is_bn]
    if not bns:
        raise SelectionError(
            f"set_bn: selector {where!r} matches no BatchNorm unit "
            f"(it matches {_some_paths(selected, 4)}). Use S.bn() or a path inside a block."
        )
    _apply(adapter, units, [(u, policy.trainable, policy.mode) for u in bns])


def snapshot(model: Any) -> dict[str, np.ndarray]:
    """Every parameter and BN statistic of ``model`` as a numpy copy.

    Example:
        >>> import xfer
        >>> before = xfer.snapshot(model)                   # doctest: +SKIP
    """
    return {k: np.array(a, copy=True) for k, a in find_adapter(model).tensors(model)}


def frozen_tensors(model: Any) -> list[str]:
    """The :func:`snapshot` keys that training must leave bit-identical: the parameters of
    frozen units and the moving statistics of BN units pinned to inference.

    Example:
        >>> import xfer
        >>> keys = xfer.frozen_tensors(model)                # doctest: +SKIP
        >>> before = xfer.snapshot(model)                    # doctest: +SKIP
    """
    adapter = find_adapter(model)
    keys = []
    for unit in adapter.units(model):
        prefix = f"{unit.path}." if unit.path else ""
        n_trainable, n_frozen = adapter.param_counts(unit)
        if n_frozen and not n_trainable:
            keys += [prefix + name for name in unit.params]
        if adapter.get_mode(unit) == "inference":
            keys += [prefix + name for name in unit.stats]
    return keys


def changed_tensors(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], keys: Sequence[str]
) -> list[str]:
    """The keys among ``keys`` whose tensors differ (bitwise) between two snapshots, or
    between two :func:`fingerprints` of them.

    Example:
        >>> import xfer
        >>> xfer.changed_tensors(before, xfer.snapshot(model), keys)   # doctest: +SKIP
        []
    """
    return [k for k in keys if not np.array_equal(before[k], after[k])]


def fingerprints(model: Any, keys: Sequence[str]) -> dict[str, str]:
    """A digest of each :func:`snapshot` tensor named in ``keys``: two equal digests mean
    bit-identical tensors (dtype and shape included), with no copy of the tensors kept.

    Example:
        >>> import xfer
        >>> keys = xfer.frozen_tensors(model)                       # doctest: +SKIP
        >>> before = xfer.fingerprints(model, keys)                 # doctest: +SKIP
        >>> before == xfer.fingerprints(model, keys)                # doctest: +SKIP
        True
    """
    wanted = set(keys)
    out = {}
    for key, array in find_adapter(model).tensors(model):
        if key in wanted:
            digest = hashlib.blake2b(f"{array.dtype.str}{array.shape}".encode(), digest_size=20)
            digest.update(np.ascontiguousarray(array))
            out[key] = digest.hexdigest()
    return out


def export_state(model: Any) -> dict[str, Any]:
    """xfer's state of ``model`` (trainable flags and mode pins per unit) as plain JSON data.

    Save it beside the framework's own checkpoint; :func:`import_state` puts it back.

    Example:
        >>> import json, xfer
        >>> json.dumps(xfer.export_state(model))            # doctest: +SKIP
    """
    adapter = find_adapter(model)
    units = {}
    for unit in adapter.units(model):
        trainable, mode = _unit_state(adapter, unit)
        units[unit.path] = {"trainable": trainable, "mode": mode}
    return {"xfer_state": STATE_FORMAT, "backend": adapter.name, "units": units}


def import_state(model: Any, state: dict[str, Any]) -> None:
    """Apply a state from :func:`export_state` to a model with the same unit paths.

    Unknown or missing paths are an error that lists them; the model is left unchanged.

    Example:
        >>> import xfer
        >>> xfer.import_state(model, saved_state)           # doctest: +SKIP
    """
    if not isinstance(state, dict) or state.get("xfer_state") != STATE_FORMAT:
        raise ValueError(
            "import_state expects the dict returned by xfer.export_state "
            f"(with 'xfer_state': {STATE_FORMAT}); got {type(state).__name__}."
        )
    adapter = find_adapter(model)
    units = {u.path: u for u in adapter.units(model)}
    saved = state["units"]
    unknown, missing = sorted(set(saved) - set(units)), sorted(set(units) - set(saved))
    if unknown or missing:
        raise ValueError(
            "The saved xfer state does not fit this model: "
            f"paths only in the state: {unknown[:8] or 'none'}; "
            f"paths only in the model: {missing[:8] or 'none'}. "
            "Load it into the same architecture it was exported from."
        )
    _check_entries(saved)
    plan = [(units[path], entry["trainable"], entry["mode"]) for path, entry in saved.items()]
    _apply(adapter, list(units.values()), plan)


def _check_entries(saved: dict[str, Any]) -> None:
    """Refuse a saved state with any malformed entry, listing every offending path."""
    not_dicts = [
        p
        for p, e in saved.items()
        if not isinstance(e, dict) or not {"trainable", "mode"} <= set(e)
    ]
    if not_dicts:
        raise ValueError(
            f"import_state: the entries of {_shown(not_dicts)} are not xfer unit states: "
            "expected a dict with 'trainable' and 'mode' for every path, as "
            "xfer.export_state writes it."
        )
    # bool only: "no" or 0 would be applied as truthy, or as a framework TypeError midway.
    bad = [
        f"{p} ({e['trainable']!r})"
        for p, e in saved.items()
        if not isinstance(e["trainable"], (bool, type(None)))
    ]
    if bad:
        raise ValueError(
            f"import_state: trainable must be True, False or None (a unit without parameters), "
            f"got {_shown(bad)}. Fix the saved state or export it again with xfer.export_state."
        )
    for entry in saved.values():
        check_mode(entry["mode"])


def _shown(names: Sequence[str], limit: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


Change = tuple[Unit, "bool | None", "str | None"]  # unit, trainable (None: keep), mode (None: keep)


def _apply(adapter: Adapter, units: list[Unit], plan: list[Change]) -> None:
    """Apply a validated plan; if it fails midway, put the state from before back and re-raise.

    Validation leaves little to fail here (a framework error, an interrupt), but a half-applied
    state is the worst outcome: some units frozen, others not, with nothing saying so.
    """
    before = [(u, *_unit_state(adapter, u)) for u in units]
    try:
        _set(adapter, plan)
    except BaseException:
        # Should putting it back fail too, Python reports both errors, the first as context.
        _set(adapter, before)
        raise


def _set(adapter: Adapter, plan: list[Change]) -> None:
    for unit, trainable, mode in plan:
        if trainable is not None:
            adapter.set_trainable(unit, trainable)
        if mode is not None:
            adapter.set_mode(unit, mode)


def _unit_state(adapter: Adapter, unit: Unit) -> tuple[bool | None, str]:
    """The unit's (trainable, mode) as :func:`export_state` records them."""
    n_trainable, n_frozen = adapter.param_counts(unit)
    trainable = None if n_trainable + n_frozen == 0 else n_frozen == 0
    return trainable, adapter.get_mode(unit)
