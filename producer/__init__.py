"""genq's client side: the wire contract, the Python client, the CLI. Imports neither torch nor Celery."""
