"""Process memory settings of a worker: glibc's malloc arenas.

glibc gives threads their own malloc arenas (up to 8 per core) and keeps freed memory inside each. A worker runs
jobs on a pool of up to 64 threads; as different threads pick up successive shards, each grows an arena of its own,
and the process's resident memory grows with the length of a job instead of staying flat (measured in
docs/benchmarks.md: peak RSS of a 20,000-image job 532 MiB with glibc's default, 425 MiB with two arenas, at the
same throughput). ``MALLOC_ARENA_MAX`` does the same from the environment but must be set before the process
starts; ``mallopt`` applies to arenas created afterwards, so the worker calls it before its pool starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("genq.memory")

M_ARENA_MAX = -8  # glibc's malloc.h


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for this process (and children forked later) at ``arenas``.

    Does nothing, and returns False, when ``arenas`` is 0, when ``MALLOC_ARENA_MAX`` is set in the environment (the
    operator's choice wins) or when the C library is not glibc (musl has no arenas to cap).
    """
    if arenas <= 0 or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_ARENA_MAX, arenas) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) refused; memory may grow with job length", arenas)
        return False
    return True
