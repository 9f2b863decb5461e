"""The progress display shared by embedding, bank signatures and bank distances."""

from __future__ import annotations

import builtins

from metalora._progress import Progress


def _without_tqdm(monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *a, **k):
        if name.startswith("tqdm"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)


def test_falls_back_to_one_stderr_line(monkeypatch, capsys):
    _without_tqdm(monkeypatch)
    with Progress(10, "metalora.embed", "text", True) as p:
        p.update(4)
        p.update(6)
    err = capsys.readouterr().err
    assert "metalora.embed: 10/10 texts" in err and err.endswith("\n")


def test_short_work_stays_silent_and_disabled_never_shows(monkeypatch, capsys):
    _without_tqdm(monkeypatch)
    with Progress(3, "quick", "item", None, delay=60.0) as p:
        p.update(3)
    with Progress(3, "off", "item", False, delay=0.0) as p:
        p.update(3)
    assert capsys.readouterr().err == ""


def test_delayed_display_starts_once_the_delay_has_passed(monkeypatch, capsys):
    _without_tqdm(monkeypatch)
    with Progress(2, "slow", "item", None, delay=0.0) as p:
        p.update()
        p.update()
    assert "slow: 2/2 items" in capsys.readouterr().err
