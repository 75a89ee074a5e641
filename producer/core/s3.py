"""The one place genq builds a boto3 S3 client: workers' storage, the client's downloads and presigned URLs, the API's
readiness probe. boto3 is imported on first use, so ``import producer`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


def make_s3_client(
    *,
    max_pool_connections: int = 16,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 30.0,
    attempts: int = 1,
) -> S3Client:
    """Return a boto3 S3 client configured from the standard ``AWS_*`` variables (endpoint, credentials, region).

    URLs are presigned with SigV4.

    Args:
        max_pool_connections: HTTP connections kept per client; at least the number of threads sharing it.
        connect_timeout_s: longest wait for a connection.
        read_timeout_s: longest wait for each read of an answer.
        attempts: tries per call, boto3's own retries included; 1 where the caller retries itself (the workers'
            storage, inside a window the operator sets) or must answer fast (the API's readiness probe).
    """
    import boto3  # lazily: a thin client imports boto3 only when it first touches S3
    import botocore.config

    config = botocore.config.Config(
        connect_timeout=connect_timeout_s,
        read_timeout=read_timeout_s,
        max_pool_connections=max_pool_connections,
        # Presigned URLs with SigV4 (boto3 presigns S3 with legacy SigV2 otherwise; newer regions refuse it).
        signature_version="s3v4",
        retries={"total_max_attempts": attempts, "mode": "standard"},
    )
    return boto3.client("s3", config=config)
