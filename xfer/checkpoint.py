"""Pipeline checkpoints: after each finished stage, the weights and everything needed to go on.

A checkpoint directory holds one manifest, ``checkpoint.json``, and the neutral weights it
names, ``stage{index}-{token}.safetensors`` (written by :func:`xfer.save_weights`). The
manifest carries xfer's state, the history so far, the last finished stage, the pipeline's
stage names, seed and batch size, the backend and xfer's version.

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
import sys
from collections.abc import Sequence
from typing import Any

from xfer._adapter import find_adapter
from xfer.files import write_json
from xfer.state import export_state, import_state
from xfer.weights import export_weights, import_weights, load_weights, save_weights

FORMAT = "xfer-checkpoint/1"
MANIFEST = "checkpoint.json"
# Our weight files and the temporary files of interrupted writes (save_weights's and ours).
_OURS = re.compile(
    r"^(stage\d+-[0-9a-f]+\.safetensors|\.stage\d+-.*\.tmp|\.checkpoint\.json\..*\.tmp)$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here: another pipeline's, another model's, or damaged."""


def backend_id(model: Any) -> str:
    """The model's backend as the tests and the CLI name it: ``keras-jax``, not ``keras``."""
    name = find_adapter(model).name
    if name == "keras" and "keras" in sys.modules:
        return f"keras-{sys.modules['keras'].backend.backend()}"
    return name


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read from a directory (see :func:`read_checkpoint`).

    Attributes:
        directory: where it lies.
        manifest: the parsed ``checkpoint.json``.
    """

    directory: str
    manifest: dict[str, Any]

    @property
    def stage_names(self) -> list[str]:
        return list(self.manifest["stages"])

    @property
    def finished(self) -> int:
        """Index of the last finished stage."""
        return int(self.manifest["last_finished"]["index"])

    @property
    def next_stage(self) -> str | None:
        """The stage a resumed run starts with; ``None`` when every stage has finished."""
        return self.manifest["next_stage"]

    @property
    def history(self) -> dict[str, Any]:
        """The history so far, as ``History.to_dict`` wrote it."""
        return self.manifest["history"]

    @property
    def weights_path(self) -> str:
        return os.path.join(self.directory, self.manifest["weights"])

    def check(self, stage_names: Sequence[str], *, seed: int, batch_size: int) -> None:
        """Raise :class:`CheckpointError` unless this checkpoint was written by a pipeline with
        these stages, seed and batch size (what makes a resumed run equal an uninterrupted one).
        """
        differences = []
        if list(stage_names) != self.stage_names:
            differences.append(f"stages {self.stage_names} there, {list(stage_names)} here")
        for key, value in (("seed", seed), ("batch_size", batch_size)):
            if self.manifest.get(key) != value:
                differences.append(f"{key} {self.manifest.get(key)!r} there, {value!r} here")
        if differences:
            raise CheckpointError(
                f"The checkpoint in {self.directory!r} belongs to another pipeline: "
                f"{'; '.join(differences)}. Resume with the pipeline that wrote it, or give "
                "this one a different checkpoint directory (xfer run --checkpoint DIR), or "
                "delete that directory to start over."
            )

    def restore(self, model: Any) -> None:
        """Load the checkpoint's weights and xfer state into ``model``.

        Everything is checked before anything is assigned: on a mismatch (another
        architecture, a missing weights file) the model is left unchanged.

        Example:
            >>> from xfer.checkpoint import read_checkpoint
            >>> read_checkpoint("ckpt").restore(model)       # doctest: +SKIP
        """
        adapter = find_adapter(model)
        source = f"written on {self.manifest.get('backend', '?')}"
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
            f"{path!r} is not a readable checkpoint manifest ({error}). Delete the directory "
            "to start over, or use another checkpoint directory."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(
            f"{path!r} is not an xfer checkpoint (format {got!r}, expected {FORMAT!r}). Use a "
            "directory of its own for checkpoints, or delete it to start over."
        )
    return Checkpoint(directory, manifest)


def write_checkpoint(
    directory: str | os.PathLike,
    model: Any,
    *,
    stage_names: Sequence[str],
    finished: int,
    history: dict[str, Any],
    seed: int,
    batch_size: int,
) -> Checkpoint:
    """Write the checkpoint of ``model`` after stage ``finished`` atomically into ``directory``.

    Example:
        >>> from xfer.checkpoint import write_checkpoint
        >>> write_checkpoint("ckpt", model, stage_names=["head", "finetune"], finished=0,
        ...                  history=history.to_dict(), seed=0, batch_size=32)  # doctest: +SKIP
    """
    from xfer import __version__

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    # A fresh name every time: the file the current manifest names is never overwritten.
    weights = f"stage{finished}-{secrets.token_hex(4)}.safetensors"
    save_weights(model, os.path.join(directory, weights))
    names = list(stage_names)
    manifest = {
        "format": FORMAT,
        "xfer_version": __version__,
        "backend": backend_id(model),
        "stages": names,
        "last_finished": {"index": finished, "name": names[finished]},
        "next_stage": names[finished + 1] if finished + 1 < len(names) else None,
        "seed": seed,
        "batch_size": batch_size,
        "weights": weights,
        "state": export_state(model),
        "history": history,
    }
    write_json(os.path.join(directory, MANIFEST), manifest)
    _remove_stale(directory, keep=weights)
    return Checkpoint(directory, manifest)


def _remove_stale(directory: str, keep: str) -> None:
    # Only after the switch: until then the old manifest needs its weights.
    for name in os.listdir(directory):
        if name != keep and _OURS.match(name):
            try:
                os.remove(os.path.join(directory, name))
            except OSError:
                pass  # removed meanwhile, or not ours to remove: harmless either way
