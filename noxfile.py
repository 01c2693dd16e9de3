"""One test session per framework, plus lint.

    nox                      # lint, the four test sessions, parity, doctests, export, external models
    nox -s export            # ONNX export with the onnx extra (jax2onnx's pins kept apart)
    nox -s tests-flax        # one of them
    nox -s tests-external    # Hugging Face transformers and Lightning, on torch 2.13.0+cpu
    nox -s tests-torchvision # torchvision and timm, on their own torch (constraints-torchvision.txt)
    nox -s tests-torch -- -k adamw   # pytest arguments after --
    nox -s bench             # benchmarks against each framework's own loop (not by default)

Each session installs only its framework; torch is pinned through constraints.txt
(a newer torch would pull several GB of CUDA packages). Keras reads KERAS_BACKEND
once per process, hence one session per Keras engine. The external-model tests
(tests/external) need libraries the four sessions do not install: they have sessions of
their own, and the four ``--ignore`` that folder.
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
nox.options.sessions = [
    "lint",
    *(f"tests-{f.label}" for f in REGISTRY),
    "parity",  # with the doctests
    "export",
    "tests-external",
    "tests-torchvision",
]

CONSTRAINTS = ("-c", "constraints.txt")
EXTERNAL = "tests/external"
# Needs every framework in one process (keras.applications -> torch -> flax -> keras) and
# builds a ResNet-50 per framework: it runs once, in the parity session.
CONVERT = "tests/test_convert.py"
# Needs the onnx extra: its own session, `export`.
EXPORT = "tests/test_export.py"


def _make_tests(backend: str, extras: list[str], env: dict[str, str]):
    @nox.session(name=f"tests-{backend}")
    def tests(session: nox.Session) -> None:
        # report: matplotlib, for the benchmark scripts' plots (tests/test_benchmarks.py).
        session.install(*CONSTRAINTS, f".[{','.join([*extras, 'report', 'dev'])}]")
        keras_home = tempfile.mkdtemp(prefix="xfer-keras-")
        session.run(
            "pytest",
            f"--ignore={EXTERNAL}",
            f"--ignore={CONVERT}",
            f"--ignore={EXPORT}",
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


def _external(session: nox.Session, constraints: str, extra: str, files: list[str]) -> None:
    session.install("-c", constraints, f".[{extra},dev]")
    session.run(
        "pytest",
        *(f"{EXTERNAL}/{name}" for name in files),
        *session.posargs,
        env={
            "XFER_TEST_BACKENDS": "torch",
            "HF_HUB_OFFLINE": "1",  # nothing is downloaded: a stray hub call fails at once
            # One thread: on a loaded 2-core machine torch's default thread pool made these
            # files 5x slower (72 s against 15 s for tests-torchvision's tests).
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        },
    )


@nox.session(name="tests-external")
def tests_external(session: nox.Session) -> None:
    """xfer on Hugging Face transformers models (a plain loop and ``Trainer``) and inside
    Lightning (stages, ``XferFinetuning`` against ``BackboneFinetuning``)."""
    _external(
        session, "constraints.txt", "test-external", ["test_huggingface.py", "test_lightning.py"]
    )


@nox.session(name="tests-torchvision")
def tests_torchvision(session: nox.Session) -> None:
    """The PyTorch transfer-learning tutorial on torchvision models, a detection backbone
    with FrozenBatchNorm2d, and timm models; on torch 2.14.1 (torchvision does not import
    beside the 2.13.0 CPU build), pinned in constraints-torchvision.txt."""
    _external(
        session,
        "constraints-torchvision.txt",
        "test-torchvision",
        ["test_torchvision.py", "test_timm.py"],
    )


@nox.session
def parity(session: nox.Session) -> None:
    """Every backend against every other, from the same neutral weights; ``xfer compare``
    end to end through the console script (tests/test_compare_command_end_to_end.py);
    ``xfer.convert`` across the three frameworks; then the docstring examples."""
    session.install(*CONSTRAINTS, ".[all,dev]")
    session.run(
        "pytest",
        "tests/test_backends_agree.py",
        "tests/test_compare_command_end_to_end.py",
        CONVERT,
        "-s",
        *session.posargs,
        env={
            "XFER_PARITY": "1",
            "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
            "KERAS_HOME": tempfile.mkdtemp(prefix="xfer-keras-"),
        },
    )
    _doctests(session)  # on the same install: a session of their own would repeat it


@nox.session
def export(session: nox.Session) -> None:
    """``xfer.export_onnx`` on every backend, checked with onnxruntime (tests/test_export.py),
    and its docstring example. Its own session: the onnx extra's jax2onnx pins
    ``orbax-checkpoint<0.11.37``, which must not constrain the others."""
    session.install(*CONSTRAINTS, ".[all,onnx,dev]")
    env = {
        "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
        "KERAS_HOME": tempfile.mkdtemp(prefix="xfer-keras-"),
    }
    # Keras reads its engine once per process: jax with torch and flax, then torch alone.
    for backends in ("torch,flax,keras-jax", "keras-torch"):
        session.run("pytest", EXPORT, *session.posargs, env={**env, "XFER_TEST_BACKENDS": backends})
    _doctests(session, "-k", "export")


@nox.session
def doctests(session: nox.Session) -> None:
    """Every docstring example of xfer and its backends runs (tests/test_docstring_examples.py);
    also run by ``parity``."""
    session.install(*CONSTRAINTS, ".[all,dev]")
    _doctests(session, *session.posargs)


def _doctests(session: nox.Session, *pytest_args: str) -> None:
    session.run(
        "pytest",
        "tests/test_docstring_examples.py",
        *pytest_args,
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
    nox -s bench -- scaling          # benchmarks/scaling.py (or compile_cache), its options after
    """
    session.install(*CONSTRAINTS, ".[all]")
    script, args = "run_all", list(session.posargs)
    if args and args[0] in ("scaling", "compile_cache"):
        script = args.pop(0)
    session.run("python", f"benchmarks/{script}.py", *args)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
