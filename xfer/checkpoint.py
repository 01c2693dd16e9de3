"""Pipeline checkpoints: after each finished stage, the weights and everything needed to go on.

A checkpoint directory holds one manifest, ``checkpoint.json``, and the neutral weights it
names, ``stage{index}-{token}.safetensors`` (written by :func:`xfer.save_weights`), with
their digest. The manifest carries xfer's state, the history so far, the last finished
stage, the configuration of every stage (for a finished stage, the one it ran with) and of
the pipeline (loss, optimizer, weight decay, batch size, seed, backend, a fingerprint of
the training data), the changes made to unfinished stages when resuming, and xfer's version.

A resumed run must end where an uninterrupted one would: :meth:`Checkpoint.check` refuses,
by name, any difference in what already ran. Changing a stage that has not finished is
allowed (lower the lr of the stage whose loss turned NaN, and resume) and recorded.

A write is atomic as a whole: the weights go to a new file (renamed into place once
complete), then the manifest that names them replaces the old manifest in one rename.
A crash at any point leaves the old manifest with the old weights, or the new with the new,
never one with the other. Weight files no manifest names are removed after the switch.
Stages are declarative (applying one resets every unit), so weights and the stage index are
all a resumed run needs; the optimizer starts afresh at every stage anyway.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any

from xfer._adapter import find_adapter
from xfer._config import label
from xfer.files import CorruptFile, verify_digest, write_json
from xfer.policy import BNPolicy
from xfer.state import export_state, import_state
from xfer.weights import export_weights, import_weights, load_weights, save_weights

FORMAT = "xfer-checkpoint/2"
MANIFEST = "checkpoint.json"
# Our weight files and the temporary files of interrupted writes (save_weights's and ours).
_OURS = re.compile(
    r"^(stage\d+-[0-9a-f]+\.safetensors|\.stage\d+-.*\.tmp|\.checkpoint\.json\..*\.tmp)$"
)
_FIX = (
    "Resume with the pipeline and data that wrote it, or give this run a different "
    "checkpoint directory (xfer run --checkpoint DIR), or delete that directory to start over."
)
_START_OVER = "Delete the directory (or use another checkpoint directory) to start over."


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: another pipeline's, another model's, or damaged."""


def backend_id(model: Any) -> str:
    """The model's backend as the tests and the CLI name it: ``keras-jax``, not ``keras``."""
    return label(find_adapter(model).name)


def stage_config(stage: Any) -> dict[str, Any]:
    """Every field of an :class:`xfer.Stage`, in the canonical form the manifest stores.

    Selectors are stored by their repr (canonical: ``path('head.**')``), a BN policy by its
    preset name, learning rates as floats.

    Example:
        >>> import xfer
        >>> from xfer import select as S
        >>> stage_config(xfer.Stage("head", train=S.path("head.**"), lr=1e-3))["train"]
        "path('head.**')"
    """
    return {
        "name": stage.name,
        "train": repr(stage.train),
        "bn": None if stage.bn is None else BNPolicy.of(stage.bn).name,
        "mode": stage.mode,
        "lr": float(stage.lr),
        "lr_groups": [[repr(selector), float(lr)] for selector, lr in stage.lr_groups],
        "epochs": stage.epochs,
        "optimizer": stage.optimizer,
        # Only when set, so that manifests written before the field still match.
        **({"recalibrate": stage.recalibrates} if stage.recalibrates else {}),
    }


# Pipeline settings that checkpoints of earlier xfer versions do not record, with the value
# those runs had.
_ADDED_SETTINGS = {"precision": "float32"}


def run_config(
    stages: Sequence[Any],
    *,
    loss: str,
    optimizer: str,
    weight_decay: float,
    batch_size: int,
    seed: int,
    backend: str,
    data: str,
    precision: str = "float32",
) -> dict[str, Any]:
    """What a checkpoint compares on resume: every stage's config and the pipeline's.

    ``backend`` is :func:`backend_id` of the model; ``data`` is
    :func:`xfer.data.data_fingerprint` of the training data.

    Example:
        >>> config = run_config(stages, loss="sparse_categorical_crossentropy",
        ...                     optimizer="adam", weight_decay=0.0, batch_size=32, seed=0,
        ...                     backend="torch", data=data_fingerprint(train))  # doctest: +SKIP
    """
    pipeline = {
        "loss": loss,
        "optimizer": optimizer,
        "weight_decay": float(weight_decay),
        "batch_size": batch_size,
        "seed": seed,
        "backend": backend,
        "data": data,
        "precision": precision,
    }
    return {"stages": [stage_config(s) for s in stages], "pipeline": pipeline, "changes": []}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from a directory (see :func:`read_checkpoint`); its manifest's
    structure has been validated.

    Attributes:
        directory: where it lies.
        manifest: the parsed ``checkpoint.json``.
    """

    directory: str
    manifest: dict[str, Any]

    @property
    def stage_names(self) -> list[str]:
        return [s["name"] for s in self.manifest["stages"]]

    @property
    def finished(self) -> int:
        """Index of the last finished stage."""
        return self.manifest["last_finished"]["index"]

    @property
    def next_stage(self) -> str | None:
        """The stage a resumed run starts with; ``None`` when every stage has finished."""
        names = self.stage_names
        return names[self.finished + 1] if self.finished + 1 < len(names) else None

    @property
    def history(self) -> dict[str, Any]:
        """The history so far, as ``History.to_dict`` wrote it."""
        return self.manifest["history"]

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, self.manifest["weights"])

    def check(self, config: dict[str, Any]) -> dict[str, Any]:
        """Raise :class:`CheckpointError` unless what already ran is what ``config`` (from
        :func:`run_config`) would run: the same stages, every field of each finished stage,
        the same loss, optimizer, weight decay, batch size, seed, backend and data.

        Returns ``config`` with the changes to unfinished stages (allowed) added to those
        the checkpoint recorded, for the next :func:`write_checkpoint`.

        Example:
            >>> config = read_checkpoint("ckpt").check(run_config(stages, ...))  # doctest: +SKIP
        """
        finished, names = self.finished, self.stage_names
        here = config["stages"]
        differences = []
        if [s["name"] for s in here] != names:
            differences.append(
                f"stages {names} in the checkpoint, {[s['name'] for s in here]} here"
            )
        else:
            for old, new in zip(
                self.manifest["stages"][: finished + 1], here[: finished + 1], strict=True
            ):
                differences += [
                    f"stage {new['name']!r} {key}: {_show(key, old.get(key))} in the "
                    f"checkpoint, {_show(key, value)} here"
                    for key, value in new.items()
                    if old.get(key) != value
                ]
        # A setting added after a checkpoint was written has its default there.
        saved = {**_ADDED_SETTINGS, **self.manifest["pipeline"]}
        differences += [
            f"{key}: {saved.get(key)!r} in the checkpoint, {value!r} here"
            for key, value in config["pipeline"].items()
            if saved.get(key) != value
        ]
        if differences:
            raise CheckpointError(
                f"The checkpoint in {self.directory!r} belongs to another pipeline: resuming "
                f"needs what already ran (the stages up to {names[finished]!r}) to be the "
                f"same: {'; '.join(differences)}. {_FIX}"
            )
        changes = list(self.manifest["changes"])
        for old, new in zip(
            self.manifest["stages"][finished + 1 :], here[finished + 1 :], strict=True
        ):
            changes += [
                {"resumed_after": names[finished], "stage": new["name"], "field": key,
                 "checkpoint": old.get(key), "here": value}
                for key, value in new.items()
                if old.get(key) != value
            ]  # fmt: skip
        return {**config, "changes": changes}

    def restore(self, model: Any) -> None:
        """Load the checkpoint's weights and xfer state into ``model``.

        Everything is checked before anything is assigned: on a mismatch (another
        architecture, a missing or damaged weights file) the model is left unchanged.

        Example:
            >>> from xfer.checkpoint import read_checkpoint
            >>> read_checkpoint("ckpt").restore(model)       # doctest: +SKIP
        """
        adapter = find_adapter(model)
        source = f"written on {self.manifest['pipeline']['backend']}"
        try:
            verify_digest(self.weights_path, self.manifest["weights_digest"])
        except (CorruptFile, FileNotFoundError) as error:
            what = "is missing" if isinstance(error, FileNotFoundError) else f"is damaged: {error}"
            raise CheckpointError(
                f"The checkpoint in {self.directory!r} cannot be resumed: its weights file "
                f"{self.manifest['weights']!r} {what} The model was left unchanged. "
                f"{_START_OVER}"
            ) from None
        fix = (
            "Resume into the model the checkpoint was written from (same architecture and "
            "number of classes), or use a different checkpoint directory (xfer run "
            "--checkpoint DIR), or delete it to start over."
        )
        saved = set(self.manifest["state"].get("units", {}))
        here = {u.path for u in adapter.units(model)}
        if saved != here:
            raise CheckpointError(
                f"The checkpoint in {self.directory!r} ({source}) is of another architecture "
                f"than this {type(model).__name__} ({backend_id(model)}); the model was left "
                f"unchanged. Units only in the checkpoint: {sorted(saved - here)[:8] or 'none'}; "
                f"only in the model: {sorted(here - saved)[:8] or 'none'}. {fix}"
            )
        before = export_weights(model)
        try:
            load_weights(model, self.weights_path)
        except (ValueError, FileNotFoundError) as error:
            raise CheckpointError(
                f"The checkpoint in {self.directory!r} ({source}) cannot be loaded into this "
                f"{type(model).__name__} ({backend_id(model)}): {error}\n{fix}"
            ) from error
        try:
            import_state(model, self.manifest["state"])
        except BaseException:
            import_weights(model, before)
            raise


def read_checkpoint(directory: str | os.PathLike) -> Checkpoint | None:
    """The checkpoint in ``directory``, or ``None`` if there is none (or no directory).

    Raises:
        CheckpointError: the manifest is unreadable, of another format or an older xfer's,
            or its structure is not a checkpoint's (each problem named).

    Example:
        >>> from xfer.checkpoint import read_checkpoint
        >>> checkpoint = read_checkpoint("ckpt")             # doctest: +SKIP
        >>> checkpoint.next_stage                            # doctest: +SKIP
        'finetune'
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{path!r} is not a readable checkpoint manifest ({error}). {_START_OVER}"
        ) from None
    got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if got == "xfer-checkpoint/1":
        raise CheckpointError(
            f"{path!r} was written by an older xfer (format {got!r}), which recorded neither "
            "the digests of its files nor the settings its stages ran with, so resuming it "
            f"could not be verified to continue the same run. {_START_OVER} (this xfer "
            f"writes {FORMAT!r}.)"
        )
    if got != FORMAT:
        raise CheckpointError(
            f"{path!r} is not an xfer checkpoint (format {got!r}, expected {FORMAT!r}). Use a "
            "directory of its own for checkpoints, or delete it to start over."
        )
    problems = _problems(manifest)
    if problems:
        raise CheckpointError(
            f"{path!r} is not a valid xfer checkpoint manifest: {'; '.join(problems)}. It was "
            f"damaged or edited; the model was left unchanged. {_START_OVER}"
        )
    return Checkpoint(directory, manifest)


def write_checkpoint(
    directory: str | os.PathLike,
    model: Any,
    *,
    config: dict[str, Any],
    finished: int,
    history: dict[str, Any],
) -> Checkpoint:
    """Write the checkpoint of ``model`` after stage ``finished`` atomically into ``directory``.

    ``config`` is :func:`run_config` of the run (or what :meth:`Checkpoint.check` returned
    when it resumed one).

    Example:
        >>> from xfer.checkpoint import run_config, write_checkpoint
        >>> write_checkpoint("ckpt", model, config=run_config(stages, ...), finished=0,
        ...                  history=history.to_dict())          # doctest: +SKIP
    """
    from xfer import __version__

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    # A fresh name every time: the file the current manifest names is never overwritten.
    weights = f"stage{finished}-{secrets.token_hex(4)}.safetensors"
    digest = save_weights(model, os.path.join(directory, weights))
    stages = config["stages"]
    manifest = {
        "format": FORMAT,
        "xfer_version": __version__,
        "stages": stages,
        "last_finished": {"index": finished, "name": stages[finished]["name"]},
        "next_stage": stages[finished + 1]["name"] if finished + 1 < len(stages) else None,
        "pipeline": config["pipeline"],
        "changes": config["changes"],
        "weights": weights,
        "weights_digest": digest,
        "state": export_state(model),
        "history": history,
    }
    write_json(os.path.join(directory, MANIFEST), manifest)
    _remove_stale(directory, keep=weights)
    return Checkpoint(directory, manifest)


def _show(key: str, value: Any) -> str:
    # Selectors as the user wrote them, not as quoted strings.
    if key == "train" and isinstance(value, str):
        return value
    if key == "lr_groups" and isinstance(value, list) and all(len(g) == 2 for g in value):
        return "[" + ", ".join(f"({s}, {lr!r})" for s, lr in value) + "]"
    return repr(value)


def _remove_stale(directory: str, keep: str) -> None:
    # Only after the switch: until then the old manifest needs its weights.
    for name in os.listdir(directory):
        if name != keep and _OURS.match(name):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass  # removed meanwhile, or not ours to remove: harmless either way


# The manifest's structure: key -> (what it must be, the types that are that).
_NUMBER, _TEXT, _OPTIONAL_TEXT = (int, float), (str,), (str, type(None))
_TOP = {
    "xfer_version": ("a string", _TEXT),
    "stages": ("a non-empty list", (list,)),
    "last_finished": ("an object", (dict,)),
    "next_stage": ("a string or null", _OPTIONAL_TEXT),
    "pipeline": ("an object", (dict,)),
    "changes": ("a list", (list,)),
    "weights": ("a string", _TEXT),
    "weights_digest": ("a string", _TEXT),
    "state": ("an object", (dict,)),
    "history": ("an object", (dict,)),
}
_STAGE = {
    "name": ("a string", _TEXT),
    "train": ("a string", _TEXT),
    "bn": ("a string or null", _OPTIONAL_TEXT),
    "mode": ("a string or null", _OPTIONAL_TEXT),
    "lr": ("a number", _NUMBER),
    "lr_groups": ("a list", (list,)),
    "epochs": ("an integer", (int,)),
    "optimizer": ("a string or null", _OPTIONAL_TEXT),
}
_PIPELINE = {
    "loss": ("a string", _TEXT),
    "optimizer": ("a string", _TEXT),
    "weight_decay": ("a number", _NUMBER),
    "batch_size": ("an integer", (int,)),
    "seed": ("an integer", (int,)),
    "backend": ("a string", _TEXT),
    "data": ("a string", _TEXT),
}
_LAST = {"index": ("an integer", (int,)), "name": ("a string", _TEXT)}
_HISTORY = {"backend": ("a string", _TEXT), "stages": ("a list", (list,))}
_UNITS = {"units": ("an object", (dict,))}


def _missing_or_mistyped(where: str, mapping: Any, fields: dict) -> list[str]:
    if not isinstance(mapping, dict):
        return [f"{where.rstrip('.')} must be an object, got {_short(mapping)}"]
    problems = []
    for key, (what, types) in fields.items():
        if key not in mapping:
            problems.append(f"{where}{key} is missing (expected {what})")
        elif isinstance(mapping[key], bool) or not isinstance(mapping[key], types):
            problems.append(f"{where}{key} must be {what}, got {_short(mapping[key])}")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _problems(manifest: dict[str, Any]) -> list[str]:
    """What is wrong with the structure of ``manifest``, each named; empty when nothing."""
    problems = _missing_or_mistyped("", manifest, _TOP)
    if problems:  # the checks below read these keys
        return problems
    stages = manifest["stages"]
    for i, stage in enumerate(stages):
        problems += _missing_or_mistyped(f"stages[{i}].", stage, _STAGE)
    problems += _missing_or_mistyped("pipeline.", manifest["pipeline"], _PIPELINE)
    problems += _missing_or_mistyped("state.", manifest["state"], _UNITS)
    problems += _missing_or_mistyped("history.", manifest["history"], _HISTORY)
    last = manifest["last_finished"]
    last_problems = _missing_or_mistyped("last_finished.", last, _LAST)
    problems += last_problems
    if not stages:
        problems.append("stages is empty (expected the pipeline's stages)")
    elif not last_problems and not 0 <= last["index"] < len(stages):
        problems.append(
            f"last_finished.index is {last['index']}, expected 0 to {len(stages) - 1} "
            f"(the checkpoint has {len(stages)} stages)"
        )
    weights = manifest["weights"]
    # Only a file of this directory: an absolute path or ".." would load a file from anywhere.
    if (
        os.path.basename(weights) != weights
        or weights in ("", ".", "..")
        or (os.path.altsep and os.path.altsep in weights)
    ):
        problems.append(f"weights must be a plain file name in the directory, got {weights!r}")
    if not manifest["weights_digest"].startswith("sha256:"):
        problems.append(
            f"weights_digest must be 'sha256:<hex>', got {_short(manifest['weights_digest'])}"
        )
    if problems:
        return problems
    names = [s["name"] for s in stages]
    if last["name"] != names[last["index"]]:
        problems.append(
            f"last_finished.name is {last['name']!r}, but stage {last['index']} is "
            f"{names[last['index']]!r}"
        )
    recorded = manifest["history"]["stages"]
    ran = [s.get("name") if isinstance(s, dict) else s for s in recorded]
    if ran != names[: last["index"] + 1]:
        problems.append(
            f"history.stages records {ran}, expected the finished stages "
            f"{names[: last['index'] + 1]}"
        )
    return problems
