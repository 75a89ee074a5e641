"""The worker's malloc arena cap: applied on glibc, and the operator's MALLOC_ARENA_MAX left alone."""

from __future__ import annotations

import platform

import pytest

from worker.memory import limit_malloc_arenas


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas are glibc's")
def test_the_arena_cap_is_applied_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas(8)  # 8 per core is glibc's own default bound: harmless for the test process


def test_an_operator_setting_or_zero_leaves_malloc_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_malloc_arenas(2)
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert not limit_malloc_arenas(0)
