"""The chaos suite's stack: real Redis, a moto S3 server, `genq worker` subprocesses and webhook receivers, into which
the tests inject real faults (SIGKILL, a Redis restart, an S3 outage, receivers that fail or hang, poison)."""

from stack_fixtures import WorkerFactory, model_root, module_worker, stack, start_worker

__all__ = ["WorkerFactory", "model_root", "module_worker", "stack", "start_worker"]
