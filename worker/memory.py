"""Process memory settings of a worker: glibc's malloc arenas and what malloc does with freed memory.

Measured with `benchmarks/throughput.py`-style runs and `benchmarks/malloc.py` (docs/benchmarks.md):

- **arenas**: glibc gives threads their own malloc arenas (up to 8 per core) and keeps freed memory inside each. A
  worker runs jobs on a pool of up to 64 threads; as different threads pick up successive shards, each grows an
  arena of its own (peak RSS 432 / 556 MiB at 4,000 / 20,000 images of one job with the defaults, 398 / 444 MiB
  with two arenas, the default here).
- **freed memory** (:class:`MallocPolicy`). glibc hands a block above its mmap threshold back to the OS when it is
  freed, and trims the top of the heap once more than the trim threshold is free there. For a CPU forward pass that
  is the expensive part: every pass allocates MiBs of activations, and each time they come back as fresh pages the
  kernel must fault in and zero one 4 KiB page at a time. On the 64x64 generator at batch 32 to 128 that was
  1,800 to 2,900 page faults per image, and batch 64 ran *slower* per image than batch 1 (64 vs 84 images/s); with
  freed memory kept for reuse (``keep``: no mmapped blocks, no trimming) it ran at 134 images/s with no faults, and
  a 6,000-image job went from 65 to 89 images/s at the same peak RSS (``python -m benchmarks.malloc``). ``keep``
  is the default. The price is that the heap never shrinks by itself, and over a long job it fragments: on a
  40,000-image job the blocks in use stayed at 130-220 MiB while the free holes between them grew to 530 MiB, all
  of it resident (peak RSS 917 MiB, still climbing). So a worker hands the heap's free pages back after each bulk
  shard (:func:`release_free_pages`): the same job then peaked at 593 MiB, flat from its first minute, at the same
  speed (182 vs 177 images/s): what is reused is faulted in once per shard, not once per forward pass. A stream of
  1-image jobs fragments the heap too (batches of every size): there it is done at most every 10 s.
  ``release`` goes the other way (a fixed 128 KiB mmap threshold: every big block goes back when freed): the least
  memory, and half the throughput. ``glibc`` leaves glibc's dynamic threshold and trimming alone.

Environment variables (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``) do the same but must be set before the process starts; ``mallopt`` applies to what is
allocated afterwards, so the worker calls it before its pool starts. Where one is set, it wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import cast

log = logging.getLogger("genq.memory")

# glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
M_ARENA_MAX = -8
RELEASE_THRESHOLD = 128 * 1024  # glibc's own starting mmap threshold, held fixed
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB above the heap's top is "never" for a worker


class MallocPolicy(StrEnum):
    """What a worker's glibc malloc does with freed memory (``GENQ_MALLOC_POLICY``)."""

    KEEP = "keep"  # freed memory stays in the process for reuse: no mmapped blocks, no trimming; fastest
    RELEASE = "release"  # blocks above 128 KiB are mmapped and unmapped when freed: flattest memory, slowest
    GLIBC = "glibc"  # glibc's dynamic mmap threshold and trimming, as any process gets


def tune_malloc(arenas: int, policy: MallocPolicy) -> dict[str, int]:
    """Cap glibc's malloc arenas at ``arenas`` (0: glibc's default) and apply ``policy``, for this process and
    children forked later. Returns what was set, by glibc option name.

    An option is left alone when its environment variable is set (the operator's choice wins), and all of them
    when the C library is not glibc (musl has none).
    """
    wanted: list[tuple[str, int, int, str]] = []  # (glibc option name, option, value, environment variable)
    if arenas:
        wanted.append(("M_ARENA_MAX", M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX"))
    if policy is MallocPolicy.KEEP:
        wanted.append(("M_MMAP_MAX", M_MMAP_MAX, 0, "MALLOC_MMAP_MAX_"))
        wanted.append(("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, NEVER_TRIM, "MALLOC_TRIM_THRESHOLD_"))
    elif policy is MallocPolicy.RELEASE:
        wanted.append(("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, RELEASE_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"))
    wanted = [option for option in wanted if not os.environ.get(option[3])]
    if not wanted:
        return {}
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for name, option, value, _env in wanted:
        if mallopt(option, value) == 1:
            applied[name] = value
        else:
            log.warning("mallopt(%s, %d) refused; the worker keeps glibc's setting", name, value)
    return applied


def release_free_pages() -> bool:
    """Hand the free pages inside malloc's heaps back to the OS (glibc ``malloc_trim(0)``); the heap keeps its
    address range, so what is allocated there again is faulted in afresh, once. False where there is no glibc.

    A worker calls it after jobs (:class:`PageReleaser`): under ``keep`` the heap fragments (the blocks in use stay
    at a few hundred MiB, the free holes between them grow), and without this the holes stay resident.
    """
    trim = _malloc_trim()
    return bool(trim is not None and trim(0) >= 0)


class PageReleaser:
    """When a worker hands the heap's free pages back: after every bulk shard (it freed its chunks, encoded images
    and tar), and after small jobs at most once per ``interval_s`` (a stream of 1-image jobs at batches of every
    size fragments the heap too; trimming after each would fault pages in again for every job). Thread-safe.
    """

    def __init__(
        self,
        interval_s: float = 10.0,
        *,
        release: Callable[[], bool] = release_free_pages,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.release = release
        self.clock = clock
        self._last = clock()
        self._lock = threading.Lock()

    def after_job(self, *, bulk: bool) -> bool:
        """Release now if due; True if pages were handed back."""
        now = self.clock()
        with self._lock:
            if not bulk and now - self._last < self.interval_s:
                return False
            self._last = now
        return self.release()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], trim)
