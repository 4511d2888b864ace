"""The robustprune command's allocator setting: applied on glibc, called once per command, harmless elsewhere."""
from __future__ import annotations

import platform

import pytest

from robustprune import cli
from robustprune.infra.allocator import keep_freed_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_setting():
    assert keep_freed_memory() is True


def test_every_command_sets_it_before_running(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["list", "models"]) == 0
    assert calls == [True]
    assert "cnn-small" in capsys.readouterr().out


def test_a_c_library_without_mallopt_is_left_alone(monkeypatch):
    import ctypes

    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert keep_freed_memory() is False
