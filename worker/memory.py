"""Process memory settings of a worker: glibc's malloc arenas and mmap threshold.

Two glibc defaults make a long-running, many-threaded worker's resident memory grow with the length of a job
instead of staying flat (measured with `benchmarks/throughput.py`-style runs of one 20,000-image job, peak RSS of
the worker at 4,000 / 20,000 images stored; docs/benchmarks.md):

- **arenas**: glibc gives threads their own malloc arenas (up to 8 per core) and keeps freed memory inside each. A
  worker runs jobs on a pool of up to 64 threads; as different threads pick up successive shards, each grows an
  arena of its own (432 / 556 MiB with the defaults, 398 / 444 MiB with two arenas).
- **the dynamic mmap threshold**: a block above the threshold (128 KiB at start) is mmapped and returned to the OS
  when freed, but each such free *raises* the threshold to that block's size (up to 32 MiB). After the first tar
  shard (a few MiB) is freed, every later shard buffer comes from the heap instead, where it fragments and stays
  (the climb left with two arenas). A fixed 128 KiB threshold keeps big buffers mmapped: 373 / 374 MiB, flat. It
  is off by default: torch's activations (MiBs per forward pass) are then mmapped and page-faulted afresh on every
  pass, and the same job ran ~35 % slower on this CPU (238 s instead of 156 s). Turn it on
  (``GENQ_MALLOC_MMAP_THRESHOLD=131072``) where memory matters more than throughput. ``malloc_trim(0)`` after each
  shard was tried too and changed nothing measurable (400 / 443 MiB).

Environment variables (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_THRESHOLD_``) do the same but must be set before the
process starts; ``mallopt`` applies to what is allocated afterwards, so the worker calls it before its pool starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("genq.memory")

# glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8


def tune_malloc(arenas: int, mmap_threshold: int) -> dict[str, int]:
    """Cap glibc's malloc arenas at ``arenas`` and fix its mmap threshold at ``mmap_threshold`` bytes, for this
    process and children forked later. Returns what was set, by glibc option name.

    An option is left alone when its value is 0, when its environment variable is set (the operator's choice
    wins), or when the C library is not glibc (musl has neither).
    """
    wanted = {
        "M_ARENA_MAX": (M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX"),
        "M_MMAP_THRESHOLD": (M_MMAP_THRESHOLD, mmap_threshold, "MALLOC_MMAP_THRESHOLD_"),
    }
    wanted = {name: opt for name, opt in wanted.items() if opt[1] > 0 and not os.environ.get(opt[2])}
    if not wanted:
        return {}
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return {}
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for name, (option, value, _env) in wanted.items():
        if mallopt(option, value) == 1:
            applied[name] = value
        else:
            log.warning("mallopt(%s, %d) refused; memory may grow with job length", name, value)
    return applied
