"""JAX's persistent compilation cache, turned on by xfer in its cache directory when a JAX
backend loads (xfer.compile_cache): where it goes, how it is turned off, that a program's
own choice is kept, and that a warm run computes what a cold run computes. Each case runs
in a fresh interpreter: JAX's configuration is per process."""

from __future__ import annotations

import pytest
from conftest import BACKENDS

from xfer.subprocesses import run_python

JAX_BACKENDS = {"flax": "flax", "keras-jax": "keras"}

RUN = """
import sys, jax, xfer
from xfer import job
from xfer.subprocesses import answer
if sys.argv[2] != "-":  # the program's own cache, which caches every compilation
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
result = job.run(sys.argv[1], quick=True)
answer({"dir": jax.config.jax_compilation_cache_dir, "losses": result.history.losses()})
"""


def _run(backend, tmp_path, own="-", **env):
    return run_python(
        RUN,
        [JAX_BACKENDS[backend], own],
        env={"XFER_CACHE": str(tmp_path / "cache"), "KERAS_BACKEND": "jax", **env},
        what=f"a quick run on {backend}",
    )


def _files(path):
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.mark.parametrize("backend", [b for b in JAX_BACKENDS if b in BACKENDS])
def test_compiled_steps_are_kept_in_xfers_cache_and_a_warm_run_computes_the_same(backend, tmp_path):
    cold = _run(backend, tmp_path)
    assert cold["dir"] == str(tmp_path / "cache" / "jax")
    written = _files(tmp_path / "cache" / "jax")
    assert written  # the steps' programs, kept for the next run
    warm = _run(backend, tmp_path)
    assert warm["losses"] == cold["losses"]  # bit-identical: the same programs
    assert _files(tmp_path / "cache" / "jax") == written  # nothing compiled anew


@pytest.mark.parametrize("backend", [b for b in JAX_BACKENDS if b in BACKENDS])
def test_the_cache_is_off_with_xfer_compile_cache_0_and_a_programs_own_is_kept(backend, tmp_path):
    off = _run(backend, tmp_path, XFER_COMPILE_CACHE="0")
    assert off["dir"] is None and not _files(tmp_path / "cache")
    own = tmp_path / "own"
    mine = _run(backend, tmp_path, own=str(own))
    assert mine["dir"] == str(own) and _files(own) and not _files(tmp_path / "cache")


CLI = """
import sys
from xfer.cli import main
from xfer.subprocesses import answer
answer(main(["run", "--backend", sys.argv[1], "--quick", "--no-compile-cache"]))
"""


@pytest.mark.parametrize("backend", [b for b in JAX_BACKENDS if b in BACKENDS])
def test_xfer_run_no_compile_cache_writes_nothing(backend, tmp_path):
    status = run_python(
        CLI,
        [JAX_BACKENDS[backend]],
        env={"XFER_CACHE": str(tmp_path / "cache"), "KERAS_BACKEND": "jax"},
        what="xfer run --no-compile-cache",
    )
    assert status == 0 and not _files(tmp_path / "cache")
