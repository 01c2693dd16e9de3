"""One test session per framework, plus lint.

    nox                      # lint and all four test sessions
    nox -s tests-flax        # one of them
    nox -s tests-torch -- -k adamw   # pytest arguments after --
    nox -s bench             # benchmarks against each framework's own loop (not by default)

Each session installs only its framework; torch is pinned through constraints.txt
(a newer torch would pull several GB of CUDA packages). Keras reads KERAS_BACKEND
once per process, hence one session per Keras engine.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

import nox


def _registry():
    """xfer's backend registry (xfer/_config.py), read without installing xfer here."""
    spec = importlib.util.spec_from_file_location("xfer_registry", "xfer/_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.REGISTRY


REGISTRY = _registry()

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", *(f"tests-{f.label}" for f in REGISTRY), "parity", "doctests"]

CONSTRAINTS = ("-c", "constraints.txt")


def _make_tests(backend: str, extras: list[str], env: dict[str, str]):
    @nox.session(name=f"tests-{backend}")
    def tests(session: nox.Session) -> None:
        session.install(*CONSTRAINTS, f".[{','.join([*extras, 'dev'])}]")
        keras_home = tempfile.mkdtemp(prefix="xfer-keras-")
        session.run(
            "pytest",
            *session.posargs,
            env={
                "XFER_TEST_BACKENDS": backend,
                "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
                "KERAS_HOME": keras_home,
                **env,
            },
        )

    return tests


for _flavour in REGISTRY:
    globals()[f"tests_{_flavour.label.replace('-', '_')}"] = _make_tests(
        _flavour.label,
        list(_flavour.extras),
        {"KERAS_BACKEND": _flavour.keras_engine} if _flavour.keras_engine else {},
    )


@nox.session
def parity(session: nox.Session) -> None:
    """Every backend against every other, from the same neutral weights; and ``xfer
    compare`` end to end through the console script (tests/test_compare_command_end_to_end.py)."""
    session.install(*CONSTRAINTS, ".[all,dev]")
    session.run(
        "pytest",
        "tests/test_backends_agree.py",
        "tests/test_compare_command_end_to_end.py",
        "tests/test_convert.py",  # keras.applications -> torch -> flax -> keras, one process
        "-s",
        *session.posargs,
        env={
            "XFER_PARITY": "1",
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
            "KERAS_HOME": tempfile.mkdtemp(prefix="xfer-keras-"),
        },
    )


@nox.session
def doctests(session: nox.Session) -> None:
    """Every docstring example of xfer and its backends runs (tests/test_docstring_examples.py)."""
    session.install(*CONSTRAINTS, ".[all,dev]")
    session.run(
        "pytest",
        "tests/test_docstring_examples.py",
        *session.posargs,
        env={
            "XFER_DOCTESTS": "1",
            "KERAS_BACKEND": "jax",
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
            "KERAS_HOME": tempfile.mkdtemp(prefix="xfer-keras-"),
        },
    )


@nox.session
def bench(session: nox.Session) -> None:
    """xfer against each framework's own loop (benchmarks/run_all.py); not in the default run.

    nox -s bench -- --quick          # options after -- go to run_all.py / transfer.py
    """
    session.install(*CONSTRAINTS, ".[all]")
    session.run("python", "benchmarks/run_all.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
