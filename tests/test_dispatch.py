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


def test_level_switched_from_another_thread_never_mixes_levels_inside_a_solve():
    """set_isa / use_isa change the level of the whole process; a native call runs at the level
    active when it starts. While another thread switches the level in a loop, every Sinkhorn
    solve must give the bits of one fixed level (here serial or the best one), never a mix."""
    import threading

    import numpy as np

    from metalora import _core

    caps = metalora.capabilities()
    levels = ["serial", caps["available"][-1]]
    if levels[0] == levels[1]:
        pytest.skip("only the serial level is available")
    rng = np.random.default_rng(7)
    X = rng.standard_normal((150, 16)).astype(np.float32)
    Y = (rng.standard_normal((120, 16)) + 0.5).astype(np.float32)
    a, b = np.full(150, 1 / 150), np.full(120, 1 / 120)

    def solve():  # tol below reach: 300 iterations at the target eps, ~1500 soft-min passes
        r = _core.dist_sinkhorn(X, Y, a, b, 0.05, 0.5, 1e-12, 300, True, 0, 2)
        keys = ("ot_xy", "ot_xx", "ot_yy", "f", "g", "p", "q")
        return tuple(np.asarray(r[k]).tobytes() for k in keys)

    before = caps["active"]
    try:
        expected = {}
        for level in levels:
            _core.set_isa(level)
            expected[solve()] = level
        assert len(expected) == 2, "the levels give the same bits: the test could not see a mix"
        stop, switches = threading.Event(), [0]

        def switch():
            while not stop.is_set():
                for level in levels:
                    _core.set_isa(level)
                switches[0] += 1

        t = threading.Thread(target=switch)
        t.start()
        try:
            results = [solve() for _ in range(8)]
        finally:
            stop.set()
            t.join()
    finally:
        _core.set_isa(before)
    assert switches[0] > 100  # the level really changed many times during the solves
    assert all(r in expected for r in results), "a solve mixed two levels"
