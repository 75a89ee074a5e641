"""The real stack for integration tests: Redis, a moto S3 server, `genq worker` subprocesses, a webhook receiver."""

from stack_fixtures import WorkerFactory, model_root, module_worker, stack, start_worker

__all__ = ["WorkerFactory", "model_root", "module_worker", "stack", "start_worker"]
