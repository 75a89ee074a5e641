"""Backends import the client without paying for torch or Celery."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_client_side_pulls_in_neither_torch_nor_celery() -> None:
    code = (
        "import sys\n"
        "import producer, producer.client, producer.contract, producer.cli, producer.status, producer.resolve\n"
        "heavy = sorted(m for m in ('torch', 'celery', 'kombu', 'boto3', 'worker', 'models') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
