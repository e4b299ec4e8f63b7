"""Progress bars: a widget in Jupyter, text in a terminal, none in logs or CI (dist/progress.py)."""

import io
import sys
import types

import pytest

from streamem.dist import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_bar_and_a_log_none():
    assert progress.progress_mode(_Tty(), environ={}) == "terminal"
    assert progress.progress_mode(io.StringIO(), environ={}) is None  # a pipe or a log file


@pytest.mark.parametrize("env", [{"CI": "true"}, {"CI": "1"}, {"STREAMEM_PROGRESS": "0"}])
def test_ci_and_the_switch_turn_bars_off_even_in_a_terminal(env):
    assert progress.progress_mode(_Tty(), environ=env) is None


def test_forced_bars_and_ci_false():
    assert progress.progress_mode(io.StringIO(), environ={"STREAMEM_PROGRESS": "1"}) == "terminal"
    assert progress.progress_mode(_Tty(), environ={"CI": "false"}) == "terminal"


def test_jupyter_gets_a_widget_or_text(monkeypatch):
    shell = types.SimpleNamespace(kernel=object())  # what an ipykernel shell has
    fake = types.SimpleNamespace(get_ipython=lambda: shell)
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert progress.in_jupyter()
    monkeypatch.setattr(progress.importlib.util, "find_spec", lambda name: object())
    assert progress.progress_mode(io.StringIO(), environ={}) == "widget"
    monkeypatch.setattr(progress.importlib.util, "find_spec", lambda name: None)
    assert progress.progress_mode(io.StringIO(), environ={}) == "notebook-text"
    assert progress.progress_mode(io.StringIO(), environ={"CI": "1"}) is None
    fake.get_ipython = lambda: types.SimpleNamespace()  # a terminal IPython: no kernel
    assert not progress.in_jupyter()


def test_chunk_bar_is_disabled_in_a_log(monkeypatch):
    monkeypatch.setattr(progress, "progress_mode", lambda: None)
    assert progress.chunk_bar(3, "x").disable
    monkeypatch.setattr(progress, "progress_mode", lambda: "terminal")
    bar = progress.chunk_bar(3, "x")
    assert not bar.disable
    bar.close()
    assert progress.chunk_bar(3, "x", enabled=False).disable
