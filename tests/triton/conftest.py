"""One interpreter run per session for every test in tests/triton (see _interpret_cases.py).

The run is a child process (the interpreter is picked when triton is imported, and this
pytest process may already have imported it). It starts as soon as collection shows a
test that needs it, and the tests that do not (the GPU-target compiles) are moved ahead
of those that do, so on two cores the compiles overlap with the interpreter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
FIXTURE = "interpreted"
_child: dict = {}


def _start_child() -> None:
    if _child:
        return
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # no pipe to fill up meanwhile
    _child.update(out=out, err=err, proc=subprocess.Popen(
        [sys.executable, "-m", "tests.triton._interpret_cases"], cwd=REPO, env=env, stdout=out, stderr=err,
        text=True))


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    here = [i for i, item in enumerate(items) if Path(str(item.fspath)).parent == Path(__file__).parent]
    mine = [items[i] for i in here]
    needs = [item for item in mine if FIXTURE in getattr(item, "fixturenames", ())]
    if not (HAS_TRITON and needs):
        return
    rest = [item for item in mine if FIXTURE not in getattr(item, "fixturenames", ())]
    for i, item in zip(here, rest + needs):  # this folder's slots, independent tests first
        items[i] = item
    _start_child()


def pytest_sessionfinish(session, exitstatus):
    """Stop a child that no test waited for (an interrupted run) and drop its output files."""
    if _child:
        if _child["proc"].poll() is None:
            _child["proc"].kill()
            _child["proc"].wait()
        _child["out"].close()
        _child["err"].close()


@pytest.fixture(scope="session")
def interpreted():
    """Results of `python -m tests.triton._interpret_cases` under TRITON_INTERPRET=1, by kind.

    Keys: header, cases, dropout_cases, dropout_checks, error_cases.
    """
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install triton)")
    _start_child()
    proc, out, err = _child["proc"], _child["out"], _child["err"]
    try:
        proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    if proc.returncode:
        pytest.fail(f"interpreter run failed (rc {proc.returncode}):\n{stdout}\n{stderr[-4000:]}")
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    result = {"header": lines[0], "cases": {}, "dropout_cases": {}}
    for line in lines[1:]:
        if "case" in line:
            result["cases"][line["case"]] = line
        elif "dropout_case" in line:
            result["dropout_cases"][line["dropout_case"]] = line
        else:
            result.update(line)  # {"dropout_checks": ...}, {"error_cases": ...}
    return result
