"""How every ``genq`` command reports bad input and failures: one line each, exit 2 for input, 1 for the rest."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

from producer.errors import GenqError, InvalidJob

console = Console(stderr=True)
Model = TypeVar("Model", bound=BaseModel)


def build(model: type[Model], fields: dict[str, Any]) -> Model:
    """``model`` from the options that were given (None left out); each invalid field on a line, then exit 2."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "request"
            console.print(f"[red]invalid request[/]: {where}: {err['msg']}")
        raise typer.Exit(2) from None


@contextmanager
def reported() -> Iterator[None]:
    """Turn InvalidJob into "invalid request" and exit 2, any other genq error into "error" and exit 1."""
    try:
        yield
    except InvalidJob as exc:
        console.print(f"[red]invalid request[/]: {exc}")
        raise typer.Exit(2) from None
    except GenqError as exc:
        console.print(f"[red]error[/]: {exc}")
        raise typer.Exit(1) from None
