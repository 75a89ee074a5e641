"""Backends import the client side without paying for torch or Celery."""

from __future__ import annotations

import subprocess
import sys


def test_importing_every_producer_module_pulls_in_neither_torch_nor_celery() -> None:
    # Every module of the producer package, the CLI and the API included: what they need of the worker or of torch is
    # imported inside the commands that need it.
    code = (
        "import importlib, pkgutil, sys\n"
        "import producer\n"
        "names = [m.name for m in pkgutil.walk_packages(producer.__path__, 'producer.')]\n"
        "names = [n for n in names if n != 'producer.cli.__main__']  # runs the command\n"
        "for name in names: importlib.import_module(name)\n"
        "assert len(names) > 30, names\n"
        "heavy = sorted(m for m in ('torch', 'celery', 'kombu', 'boto3', 'worker', 'models') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
