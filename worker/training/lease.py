"""A lease on a job in Redis: one holder at a time, kept alive by a heartbeat, gone soon after its holder dies.

Fine-tunes outlive the broker's visibility timeout, and kombu's Redis transport then delivers the same message again
while the first worker still trains (celery#2599). The lease is what makes that harmless: the second delivery finds
the job leased, waits, and either sees the job end (and acks) or takes the lease over once the holder stopped
renewing it — a dead worker — and resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import threading
import uuid

import redis

from producer.core import constants
from producer.core.scripts import read_lua

log = logging.getLogger("genq.lease")

# Extend / delete the lease only while we still hold it; each script's header names its KEYS, ARGV and returns.
_RENEW = read_lua(__package__, "renew.lua")
_RELEASE = read_lua(__package__, "release.lua")


class Lease:
    """The right to run one job, held by one process at a time.

    >>> lease = Lease(client, job_id, ttl_s=30)
    >>> if lease.acquire():
    ...     with lease.heartbeat():
    ...         train()  # check lease.lost between steps
    """

    def __init__(self, client: redis.Redis, job_id: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl_s}")
        self.redis = client
        self.key = constants.TRAIN_LEASE_KEY.format(job_id=job_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()  # set when a renewal found the lease gone or taken
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; True on success."""
        return bool(self.redis.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def holder(self) -> str | None:
        """The token of the current holder, or None when the lease is free."""
        raw = self.redis.get(self.key)
        return raw.decode() if isinstance(raw, bytes) else raw

    def renew(self) -> bool:
        """Extend the lease by its ttl; False (and :attr:`lost` set) when it is no longer ours."""
        if int(self._renew(keys=[self.key], args=[self.token, self.ttl_ms])) == 1:
            return True
        self.lost.set()
        return False

    def release(self) -> None:
        """Give the lease up (only if still ours) and stop the heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._release(keys=[self.key], args=[self.token])

    def heartbeat(self) -> Lease:
        """Renew every third of the ttl in a daemon thread until :meth:`release`; use as a context manager."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"genq-lease-{self.key}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.renew():
                    log.error("lease %s was lost: another worker may run this job; stopping", self.key)
                    return
            except redis.RedisError as exc:  # keep trying: the lease survives a blip shorter than its ttl
                log.warning("could not renew lease %s: %s", self.key, exc)
