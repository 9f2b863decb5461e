"""Fault tests (issue 16): SIGKILL ``metalora generate`` and ``metalora bank add`` at seeded
random times; the output is absent or complete and valid, an overwritten adapter is never lost,
no temporary survives the next run, and the bank's files stay byte-identical. CI runs a few
kills (``METALORA_FAULT_KILLS``, default 6); bench/hostile.py runs many more."""

from __future__ import annotations

import os
import shutil

import pytest

from _faults import fault_campaign

pytest.importorskip("metalora.embed")


def test_sigkill_during_generate_and_bank_add(tmp_path):
    from metalora.demo import demo_bank, example_dataset

    bank = tmp_path / "bank"
    shutil.copytree(demo_bank(), bank)
    kills = int(os.environ.get("METALORA_FAULT_KILLS", "6"))
    res = fault_campaign(tmp_path, bank, example_dataset(), kills=kills, seed=16, max_delay=4.0)
    assert res["faults"] == kills
    assert res == {**res, "outputs_lost": 0, "invalid_outputs": 0, "temporaries_left": 0,
                   "bank_files_changed": 0, "crashes": 0}, res
