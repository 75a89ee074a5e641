"""The ``genq`` command: the top floor, the only code that reaches into ``worker`` and ``models`` (lazily, inside
the commands that need them: embedded mode, ``genq worker``, ``genq train``/``eval``/``models``).

``pip install genq`` installs the producer side (client, CLI, HTTP API); those commands need the worker side too,
``pip install 'genq[worker]'`` (torch, numpy, Pillow, safetensors): without it they say so in one line.
"""

from __future__ import annotations

import sys

from rich.markup import escape

from producer.cli.exits import INVALID
from producer.cli.main import app, console

__all__ = ["app", "run"]

WORKER_SIDE = ("torch", "numpy", "PIL", "safetensors")  # what `genq[worker]` adds to `genq`


def run() -> None:
    """The ``genq`` console script: :data:`app`, with a missing worker-side package said in one line (exit 2)."""
    try:
        app(prog_name="genq")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in WORKER_SIDE:
            raise
        command = " ".join(["genq", *sys.argv[1:2]])
        message = f"{command} needs genq's worker side, which is not installed here (no module {exc.name!r})"
        console.print(f"[red]error[/]: {escape(message)}: pip install {escape(repr('genq[worker]'))}", soft_wrap=True)
        sys.exit(INVALID)
