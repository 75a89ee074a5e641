"""Redis Lua scripts, kept in ``.lua`` files in a ``lua/`` folder beside the module that runs them.

Each module reads its scripts once, at import, and registers them on its client::

    _TRANSITION = read_lua(__package__, "transition.lua")
    ...
    self._transition = client.register_script(_TRANSITION)
"""

from __future__ import annotations

from importlib.resources import files


def read_lua(package: str | None, name: str) -> str:
    """The source of the script ``name`` in ``package``'s ``lua/`` folder (shipped as package data).

    Args:
        package: the calling module's ``__package__``.
        name: the script's file name, such as ``"transition.lua"``.

    Raises:
        ValueError: ``package`` is empty (a top-level module has no folder of scripts).
        FileNotFoundError: no such script; a ``lua/*.lua`` glob missing from ``[tool.setuptools.package-data]``
            leaves them out of an installed wheel.
    """
    if not package:
        raise ValueError(f"cannot find {name!r}: read_lua needs the calling module's package (pass __package__)")
    return (files(package) / "lua" / name).read_text(encoding="utf-8")
