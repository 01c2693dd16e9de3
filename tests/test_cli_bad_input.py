"""Bad input to the console script: one line on stderr, no traceback, a non-zero status.

Each test runs the real ``python -m xfer`` in a subprocess with this worktree's xfer, an
empty cache and home, as a user would meet it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

import xfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(xfer.__file__)))


def _xfer(tmp_path, *args, **env):
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environ = {
        **os.environ,
        # A test's shadow packages come first: before the installed ones too.
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), ROOT]),
        "HOME": str(home),
        "XFER_CACHE": str(tmp_path / "cache"),
        "KERAS_HOME": str(home / ".keras"),
        "JAX_PLATFORMS": "cpu",
        **env,
    }
    if "XFER_DEBUG" not in env:
        environ.pop("XFER_DEBUG", None)
    # From a directory of its own: `-m` puts the working directory first on sys.path, and
    # a source checkout there would shadow the installed xfer.
    return subprocess.run(
        [sys.executable, "-m", "xfer", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=300,
        cwd=tmp_path,
    )


def _assert_one_line(out, command: str, message: str, status: int = 2) -> None:
    assert out.returncode == status, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"xfer {command}: ")
    assert message in lines[0]


def test_an_unknown_backend_in_the_environment_is_one_line(tmp_path):
    out = _xfer(tmp_path, "run", "--quiet", XFER_BACKEND="nope")
    _assert_one_line(out, "run", "Unknown xfer backend 'nope'")


@pytest.mark.skipif(
    importlib.util.find_spec("keras") is None, reason="Keras is not installed in this session"
)
def test_keras_on_tensorflow_is_one_line(tmp_path):
    out = _xfer(tmp_path, "run", "--quiet", "--backend", "keras", KERAS_BACKEND="tensorflow")
    _assert_one_line(out, "run", "set KERAS_BACKEND=jax or torch")


def test_a_backend_whose_framework_cannot_be_imported_is_one_line(tmp_path):
    # Packages that are found but fail to import, as a broken install does (all that the
    # flax backend imports, so that whichever comes first fails, in any session).
    for package in ("flax", "optax", "jax"):
        shadow = tmp_path / "shadow" / package
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(f"raise ImportError('{package} is broken here')\n")
    out = _xfer(tmp_path, "run", "--quiet", "--backend", "flax")
    _assert_one_line(out, "run", "is broken here")


def test_a_checkpoint_below_a_regular_file_is_one_line(tmp_path):
    regular = tmp_path / "FILE"
    regular.write_text("not a directory")
    out = _xfer(
        tmp_path,
        "run",
        "--quiet",
        "--quick",
        "--backend",
        "torch",
        "--checkpoint",
        str(regular / "ckpt"),
    )
    assert out.returncode in (1, 2), out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("xfer run: ")
    assert regular.read_text() == "not a directory"


def test_xfer_debug_keeps_the_traceback(tmp_path):
    out = _xfer(tmp_path, "run", "--quiet", XFER_BACKEND="nope", XFER_DEBUG="1")
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "Unknown xfer backend 'nope'" in out.stderr


@pytest.mark.parametrize(
    "error, status",
    [
        (ValueError("bad\nvalue"), 2),
        (FileNotFoundError("no such file"), 2),
        (KeyboardInterrupt(), 130),
    ],
)
def test_main_turns_errors_into_a_status_and_one_line(monkeypatch, capsys, error, status):
    from xfer import cli

    def fail(args):
        raise error

    monkeypatch.delenv("XFER_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_info", fail)
    assert cli.main(["info"]) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("xfer info: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
        (["run", "--seed", "0.5"], "argument --seed: expected an integer >= 0, got '0.5'"),
        (["run", "--backend", "tensorflow"], "argument --backend: invalid choice: 'tensorflow'"),
        (["compare", "--bn", "freeze"], "argument --bn: invalid choice: 'freeze'"),
    ],
)
def test_a_bad_option_is_one_line_before_anything_runs(tmp_path, args, message):
    out = _xfer(tmp_path, *args)
    _assert_one_line(out, args[0], message)
    assert out.stderr.strip().endswith(f"(see xfer {args[0]} --help)")


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is not None, reason="jax is installed in this session"
)
def test_a_backend_whose_framework_is_missing_names_the_extra_to_install(tmp_path):
    out = _xfer(tmp_path, "run", "--quiet", "--backend", "flax")
    _assert_one_line(out, "run", 'pip install "xfer[flax]"')


@pytest.mark.parametrize(
    "export, message",
    [
        ("model.pt", "'model.pt' does not end in .onnx"),
        ("missing/model.onnx", "the directory 'missing' of 'missing/model.onnx' does not exist"),
    ],
)
def test_a_bad_export_path_is_refused_before_anything_trains(kit, tmp_path, export, message):
    backend = kit.id.partition("-")[0]
    for data in ([], ["--data", "digits"]):
        if data:
            assert _xfer(tmp_path, "digits", "digits").returncode == 0
        out = _xfer(tmp_path, "run", "--backend", backend, "--quick", *data, "--export", export)
        _assert_one_line(out, "run", message)
        assert "stage" not in out.stdout  # no table: nothing trained
