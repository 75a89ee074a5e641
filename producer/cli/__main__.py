"""``python -m producer.cli``: the ``genq`` command."""

from producer.cli.main import app

app(prog_name="genq")
