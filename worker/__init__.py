"""genq's runtime: the Celery app, thin tasks over a pure pipeline, model registry, storage and callbacks."""
