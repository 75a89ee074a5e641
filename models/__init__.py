"""Pure PyTorch: architectures, training, sampling and metrics. Knows nothing of Celery, Redis or S3."""
