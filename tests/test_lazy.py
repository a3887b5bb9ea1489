"""`unimm.lazy.when_imported`: a callback after a module's first import, or at once when it is imported."""

from __future__ import annotations

import sys

from unimm.lazy import when_imported


def test_callback_runs_after_the_first_import_with_the_module_complete(tmp_path, monkeypatch):
    (tmp_path / "late_module.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("late_module", lambda: seen.append(sys.modules["late_module"].VALUE))
    assert seen == []
    import late_module

    assert seen == [42]
    assert type(late_module.__loader__).__name__ == "SourceFileLoader"  # the wrapper is gone again
    del sys.modules["late_module"]
    import late_module  # a second import: the hook fired once and left

    assert seen == [42]


def test_callback_runs_at_once_for_an_imported_module():
    seen = []
    when_imported("json", lambda: seen.append(True))
    assert seen == [True]
