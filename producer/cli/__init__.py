"""The ``genq`` command: the top floor, the only code that reaches into ``worker`` and ``models`` (lazily, inside
the commands that need them: embedded mode, ``genq worker``, ``genq train``/``eval``/``models``).
"""

from producer.cli.main import app

__all__ = ["app"]
