"""xfer's one subprocess runner (Keras's other engine for compare and semantics)."""

from __future__ import annotations

import pytest

from xfer.subprocesses import ChildFailed, run_python


def test_the_answer_is_found_among_whatever_else_the_child_prints():
    code = (
        "import sys\n"
        "from xfer.subprocesses import answer\n"
        "print('a framework says hello'); print('{\"not\": \"the answer\"}')\n"
        "answer({'args': sys.argv[1:]})\n"
        "print('and goodbye')\n"
    )
    assert run_python(code, ["x", "y"]) == {"args": ["x", "y"]}


def test_a_failing_child_is_one_error_with_the_end_of_its_stderr():
    with pytest.raises(ChildFailed, match=r"keras-torch failed \(exit 1\): .*ValueError: broken"):
        run_python("raise ValueError('broken')", what="keras-torch")


def test_a_child_without_an_answer_fails_even_with_exit_0():
    with pytest.raises(ChildFailed, match=r"exit 0"):
        run_python("print('no answer here')")


def test_a_child_that_hangs_is_stopped(tmp_path):
    with pytest.raises(ChildFailed, match="did not finish within 1 s"):
        run_python("import time; time.sleep(30)", timeout=1)


def test_the_child_runs_outside_the_working_directory(tmp_path, monkeypatch):
    # A checkout in the working directory must not shadow the installed xfer.
    monkeypatch.chdir(tmp_path)
    code = "import os\nfrom xfer.subprocesses import answer\nanswer(os.getcwd())"
    assert run_python(code) != str(tmp_path)
