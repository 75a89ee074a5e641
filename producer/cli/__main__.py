"""``python -m producer.cli``: the ``genq`` command."""

from producer.cli import run

run()
