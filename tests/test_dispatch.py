"""Run-time dispatch: capabilities, forcing a level, and METALORA_ISA."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import metalora


def test_capabilities_lists_levels():
    caps = metalora.capabilities()
    assert caps["compiled"][0] == "serial"
    assert set(caps["available"]) <= set(caps["compiled"])
    assert caps["active"] in caps["available"]
    assert caps["default"] == caps["available"][-1]
    assert caps["threads"] >= 1


def test_use_isa_switches_and_restores():
    before = metalora.capabilities()["active"]
    with metalora.use_isa("serial"):
        assert metalora.capabilities()["active"] == "serial"
    assert metalora.capabilities()["active"] == before


def test_unavailable_level_is_refused():
    caps = metalora.capabilities()
    missing = [lvl for lvl in metalora.LEVELS if lvl not in caps["available"]]
    if not missing:
        pytest.skip("every level is available on this machine")
    with pytest.raises(ValueError, match="not available here"):
        metalora.set_isa(missing[0])
    with pytest.raises(ValueError, match="not available here"):
        metalora.set_isa("sse9")


def run_with_env(value: str) -> subprocess.CompletedProcess:
    code = "import metalora; print(metalora.capabilities()['active'])"
    env = dict(os.environ, METALORA_ISA=value)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_forces_a_lower_level():
    proc = run_with_env("serial")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "serial"


def test_environment_variable_with_unknown_level_warns():
    proc = run_with_env("quantum")
    assert proc.returncode == 0, proc.stderr
    assert "METALORA_ISA='quantum' is not available" in proc.stderr
    assert proc.stdout.strip() == metalora.capabilities()["default"]
