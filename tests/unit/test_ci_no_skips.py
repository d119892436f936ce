"""Under CI (CI=true) no test may skip: the hooks in tests/conftest.py report every kind of skip as a failure.

A small suite of its own runs in a child pytest with this suite's conftest as a plugin, once as on a developer's
machine and once under CI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

SKIPPING = '''
import pytest


def test_skips_in_its_body():
    pytest.skip("the frobnicator is not installed")


@pytest.mark.skipif(True, reason="only where the frobnicator is")
def test_skipif_mark():
    pass


@pytest.mark.skip(reason="marked to skip")
def test_skip_mark():
    pass


@pytest.fixture
def tool():
    pytest.skip("the tool is missing")


def test_skipping_fixture(tool):
    pass


def test_runs():
    pass


def test_expected_failure():
    pytest.xfail("a known gap, not a skip")
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("mlsignal_no_such_module")


def test_never_collected():
    pass
'''


def run_suite(tmp_path: Path, ci: str | None) -> tuple[int, str]:
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent), env.get("PYTHONPATH", "")])
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", "-ra",
                           "--continue-on-collection-errors", "--rootdir", str(tmp_path), str(tmp_path)],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=240)
    return proc.returncode, proc.stdout + proc.stderr


def summary(output: str) -> str:
    return [line for line in output.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?)", line)][-1]


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_skips_are_skips(tmp_path, ci):
    code, output = run_suite(tmp_path, ci)
    assert code == 0, output
    last = summary(output)
    assert "5 skipped" in last and "1 passed" in last and "1 xfailed" in last, output
    assert not re.search(r"\d+ (failed|errors?)\b", last), output


def test_under_ci_every_skip_fails(tmp_path):
    code, output = run_suite(tmp_path, "true")
    assert code != 0, output
    last = summary(output)
    assert "skipped" not in last, output
    assert "1 failed" in last and "4 errors" in last, output  # the body; three set-ups and the module
    assert "1 passed" in last and "1 xfailed" in last, output  # an expected failure is not a skip
    for reason in ("the frobnicator is not installed", "only where the frobnicator is", "marked to skip",
                   "the tool is missing", "mlsignal_no_such_module"):
        assert re.search(rf"skipped under CI=true, where every test must run .*{reason}", output), (reason, output)
