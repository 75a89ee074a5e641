"""The JSON form of the models' config dataclasses: what ``config.json``, ``classifier.json`` and checkpoint
headers hold, written and read by one implementation so that every config round-trips the same way."""

from __future__ import annotations

import typing
from dataclasses import MISSING, Field, asdict, fields
from typing import Any, ClassVar, Self


class JsonConfig:
    """Mixin for a frozen config dataclass: ``to_json`` and ``from_json`` over its fields.

    Tuple fields are written as JSON lists and read back as tuples; a field that is itself a :class:`JsonConfig`
    is written and read through its own methods. Reading ignores unknown keys, so a config written by a newer
    version with an extra field still loads; a missing key takes the field's default, or () for a required tuple.
    """

    # Set by @dataclass on the subclass; declared so that type checkers accept ``asdict(self)``.
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def to_json(self) -> dict[str, Any]:
        """The config as a JSON-ready dict, one key per field in field order."""
        data = asdict(self)
        tuples, nested = _special_fields(type(self))
        for name in tuples:
            data[name] = list(getattr(self, name))
        for name in nested:
            data[name] = getattr(self, name).to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        """Build the config from what :meth:`to_json` wrote, ignoring unknown keys.

        Raises:
            InvalidModelConfig: the values fail the config's own checks.
        """
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        tuples, nested = _special_fields(cls)
        for name in tuples:
            if name in known:
                known[name] = tuple(known[name])
            elif cls.__dataclass_fields__[name].default is MISSING:
                # A required list (the class names) that is missing reads as empty, so the config's own check
                # reports it as an InvalidModelConfig rather than a TypeError about a missing argument.
                known[name] = ()
        for name, kind in nested.items():
            if name in known:
                known[name] = kind.from_json(known[name])
        return cls(**known)


def _special_fields(cls: type[JsonConfig]) -> tuple[tuple[str, ...], dict[str, type[JsonConfig]]]:
    """The fields of ``cls`` that JSON cannot hold as they are: the tuple fields, and the nested configs by type."""
    # The configs' modules postpone annotations: resolve the strings to types. Not cached: configs are
    # converted only when saved or loaded.
    hints = typing.get_type_hints(cls)
    tuples = tuple(f.name for f in fields(cls) if typing.get_origin(hints[f.name]) is tuple)
    nested = {
        f.name: hints[f.name]
        for f in fields(cls)
        if isinstance(hints[f.name], type) and issubclass(hints[f.name], JsonConfig)
    }
    return tuples, nested
