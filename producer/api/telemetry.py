"""Prometheus metrics of the HTTP API, in a registry of its own (one per app, so tests can run several apps)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.core import constants
from producer.core.store import JobStore

log = logging.getLogger("genq.api")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _QueueDepth(Collector):
    """``genq_queue_depth{queue}``: messages waiting in each Celery queue (``LLEN``), read at scrape time."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("genq_queue_depth", "Messages waiting in a Celery queue.", labels=["queue"])
        for queue in (*constants.WORKER_QUEUES, constants.TRAIN_QUEUE):
            try:
                family.add_metric([queue], float(self.redis.llen(queue)))
            except redis.RedisError as exc:  # a scrape must not fail because Redis is down; readyz says that
                log.warning("queue depth of %r unavailable: %s", queue, exc)
        yield family


class _JobsByStatus(Collector):
    """``genq_jobs{status}``: jobs per status from the counters the job store keeps in Redis, read at scrape time.

    queued and running are current counts; succeeded, failed and canceled are cumulative since the Redis DB was
    created (job records expire, the counters do not), so ``rate()`` over them gives jobs ending per second.
    """

    def __init__(self, store: JobStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "genq_jobs",
            "Jobs per status: queued/running now; succeeded/failed/canceled since the Redis DB was created.",
            labels=["status"],
        )
        try:
            counts = self.store.counts_by_status()
        except redis.RedisError as exc:  # as for the queue depth: an empty family, not a failed scrape
            log.warning("jobs by status unavailable: %s", exc)
            counts = {}
        except Exception:  # a bug or a corrupt counter must not fail the scrape of every other metric
            log.exception("jobs by status unavailable")
            counts = {}
        for status, count in counts.items():
            family.add_metric([status.value], float(count))
        yield family


class ApiMetrics:
    """The API's counters and histograms, and the gauges read from Redis at scrape time."""

    def __init__(self, client: redis.Redis, store: JobStore) -> None:
        self.registry = CollectorRegistry()
        self.jobs_submitted = Counter(
            "genq_jobs_submitted", "Jobs accepted through the API, by model name.", ["model"], registry=self.registry
        )
        self.requests = Counter(
            "genq_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "genq_http_request_duration_seconds",
            "Time to answer an HTTP request (an SSE stream counts until it ends).",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=self.registry,
        )
        self.registry.register(_QueueDepth(client))
        self.registry.register(_JobsByStatus(store))

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
