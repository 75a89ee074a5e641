"""The worker's malloc tuning: each policy's options applied on glibc, the operator's environment variables left
alone."""

from __future__ import annotations

import platform

import pytest

from worker.memory import NEVER_TRIM, RELEASE_THRESHOLD, MallocPolicy, PageReleaser, tune_malloc

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas and mmap thresholds are glibc's")
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


@pytest.fixture(autouse=True)
def no_operator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in MALLOC_ENV:
        monkeypatch.delenv(name, raising=False)


# These run in the test process: glibc's own bound of 8 arenas per core and its starting 128 KiB threshold are
# harmless there, and "keep" only stops the process handing freed memory back.
@glibc_only
@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (MallocPolicy.KEEP, {"M_ARENA_MAX": 8, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": NEVER_TRIM}),
        (MallocPolicy.RELEASE, {"M_ARENA_MAX": 8, "M_MMAP_THRESHOLD": RELEASE_THRESHOLD}),
        (MallocPolicy.GLIBC, {"M_ARENA_MAX": 8}),
    ],
)
def test_each_policy_sets_its_glibc_options(policy: MallocPolicy, expected: dict[str, int]) -> None:
    assert tune_malloc(8, policy) == expected


@glibc_only
def test_an_operator_setting_or_zero_leaves_that_option_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    assert tune_malloc(2, MallocPolicy.KEEP) == {"M_MMAP_MAX": 0}
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert tune_malloc(0, MallocPolicy.GLIBC) == {}


def test_the_policy_setting_names_the_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from worker.settings import WorkerSettings

    monkeypatch.setenv("GENQ_MALLOC_POLICY", "fast")
    with pytest.raises(ValidationError, match="(?s)malloc_policy.*'keep', 'release' or 'glibc'"):
        WorkerSettings()


# In a fresh process: "keep" there must not leak into the test process's other tests.
_HOLES = """
import json, sys
from worker.memory import MallocPolicy, release_free_pages, tune_malloc

def rss_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024

tune_malloc(2, MallocPolicy.KEEP)
blocks = [bytearray(b"x" * 65536) for _ in range(2048)]  # 128 MiB in the heap: keep maps no block of its own
pin = bytearray(65536)  # in use above them: the heap's top cannot shrink, only its holes can go
del blocks
held = rss_mib()
released = release_free_pages()
print(json.dumps({"held": held, "after": rss_mib(), "released": released}))
"""


@glibc_only
def test_free_pages_held_by_keep_go_back_to_the_os_when_released() -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HOLES], capture_output=True, text=True, check=True, timeout=60)
    figures = json.loads(out.stdout)
    assert figures["released"]
    assert figures["held"] - figures["after"] > 100, figures  # of the 128 MiB freed under keep


@pytest.mark.parametrize(
    ("jobs", "expected"),
    [
        ([(1.0, False), (2.0, False), (9.9, False)], []),  # small jobs inside the interval: none
        ([(1.0, False), (10.0, False), (15.0, False), (20.5, False)], [10.0, 20.5]),  # at most once per 10 s
        ([(1.0, True), (1.5, True), (2.0, False)], [1.0, 1.5]),  # after every bulk shard; it restarts the interval
        ([(5.0, True), (12.0, False), (15.0, False)], [5.0, 15.0]),
    ],
)
def test_free_pages_go_back_after_each_bulk_shard_and_at_most_every_interval_after_small_jobs(
    jobs: list[tuple[float, bool]], expected: list[float]
) -> None:
    now = [0.0]
    released: list[float] = []
    releaser = PageReleaser(10.0, release=lambda: released.append(now[0]) is None, clock=lambda: now[0])

    for at, bulk in jobs:
        now[0] = at
        assert releaser.after_job(bulk=bulk) == (at in expected)

    assert released == expected
