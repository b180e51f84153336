"""The rule that CI never passes by skipping: under CI=true a missing optional dependency fails its tests."""
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import require, require_tool

ABSENT_MODULE = "bcnswift_tests_no_such_module"
ABSENT_COMMAND = "bcnswift-tests-no-such-command"


@pytest.mark.parametrize("ci", ["true", "True"])
def test_a_missing_dependency_fails_under_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match="required under CI=true"):
        require(ABSENT_MODULE)
    with pytest.raises(pytest.fail.Exception, match=f"{ABSENT_COMMAND} is required under CI=true"):
        require_tool("python3", ABSENT_COMMAND, hint="a test")


@pytest.mark.parametrize("ci", [None, "", "false", "1"])
def test_a_missing_dependency_skips_elsewhere(monkeypatch, ci):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception, match=ABSENT_MODULE):
        require(ABSENT_MODULE)
    with pytest.raises(pytest.skip.Exception, match=ABSENT_COMMAND):
        require_tool(ABSENT_COMMAND, hint="a test")


def test_present_dependencies_pass(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require("numpy") is np
    assert require_tool("python3", hint="a test") == shutil.which("python3")
    assert require_tool("python3", "sh", hint="a test") == [shutil.which("python3"), shutil.which("sh")]


def test_every_optional_dependency_goes_through_require():
    """pytest's own importorskip, and a skip when shutil.which finds nothing, would skip under CI too: no test
    file but conftest.py uses them (the remaining pytest.skip calls are for other platforms)."""
    here = Path(__file__).resolve().parent
    exempt = ("conftest.py", Path(__file__).name)
    offenders = [f"{p.name}:{i}" for p in sorted(here.glob("*.py")) if p.name not in exempt
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if "importorskip" in line or "shutil.which" in line]
    assert not offenders, f"use conftest.require or require_tool: {offenders}"
