"""The worker's malloc tuning: applied on glibc, and the operator's environment variables left alone."""

from __future__ import annotations

import platform

import pytest

from worker.memory import tune_malloc

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas and mmap thresholds are glibc's")


@glibc_only
def test_both_options_are_applied_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    # 8 arenas per core is glibc's own bound and 128 KiB its starting threshold: harmless for the test process.
    assert tune_malloc(8, 128 * 1024) == {"M_ARENA_MAX": 8, "M_MMAP_THRESHOLD": 128 * 1024}


@glibc_only
def test_an_operator_setting_or_zero_leaves_that_option_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert tune_malloc(2, 128 * 1024) == {"M_MMAP_THRESHOLD": 128 * 1024}
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert tune_malloc(0, 0) == {}
