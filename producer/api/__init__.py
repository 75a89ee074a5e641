"""The HTTP API (FastAPI): a thin layer over the client and the contract.

Run it with ``genq api`` or ``uvicorn --factory producer.api:create_app``.
"""

from producer.api.app import create_app

__all__ = ["create_app"]
