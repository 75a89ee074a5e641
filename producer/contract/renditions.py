"""Post-processing in the wire contract: the renditions a request asks of every sample, each a target size, a fit,
a resampling filter and an ordered list of enhancement operations with bounded parameters.

Pure data and arithmetic (no Pillow here: ``import producer`` stays light); the worker applies them in
:mod:`worker.generate.postprocess`. :func:`output_size` is shared by both sides, so the limit on output pixels that
the edge checks is computed exactly as the worker will size the images.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from producer.contract.fields import NotBool

MAX_SIDE = 4096
"""Largest width or height of a rendition, in pixels (a 4096 x 4096 RGB image is 48 MiB in memory)."""
MAX_RENDITIONS = 8
MAX_OPS = 8
RENDITION_NAME_PATTERN = r"^[a-z0-9][a-z0-9_]{0,31}$"  # part of object keys (<index>-<name>.<ext>): no '-', '.', '/'
_COLOUR = re.compile(r"#(?P<hex>[0-9a-fA-F]{6}|[0-9a-fA-F]{3})\Z")

Fit = Literal["contain", "cover", "pad"]
"""How a sample meets the target box: ``contain`` scales it to fit inside (the output may be smaller than the box
on one side), ``cover`` scales it to fill the box and crops the overflow evenly (output exactly the box), ``pad``
scales it to fit inside and centres it on the box filled with ``background`` (output exactly the box)."""
Resample = Literal["lanczos", "bicubic", "bilinear", "nearest"]
"""Resampling filter of the resize (Pillow's); ``nearest`` keeps the hard pixels of a small sample scaled up."""

Side = Annotated[int, NotBool, Field(ge=1, le=MAX_SIDE)]


class Autocontrast(BaseModel):
    """Stretch the histogram so the darkest pixels become black and the lightest white (Pillow's autocontrast)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["autocontrast"] = "autocontrast"
    cutoff: Annotated[float, NotBool, Field(ge=0, lt=50)] = Field(
        default=0.0, description="Percent of the histogram ignored at each end before stretching (0 to <50)."
    )


class UnsharpMask(BaseModel):
    """Sharpen edges: add back ``percent`` of the difference from a Gaussian blur of ``radius`` where it exceeds
    ``threshold`` grey levels (Pillow's UnsharpMask)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["unsharp_mask"] = "unsharp_mask"
    radius: Annotated[float, NotBool, Field(gt=0, le=50)] = Field(default=2.0, description="Blur radius in pixels.")
    percent: Annotated[int, NotBool, Field(ge=1, le=500)] = Field(default=150, description="Strength, in percent.")
    threshold: Annotated[int, NotBool, Field(ge=0, le=255)] = Field(
        default=3, description="Least difference, in grey levels, that is sharpened."
    )


class Contrast(BaseModel):
    """Scale contrast around the mean grey: 1 leaves the image as it is, 0 makes it flat grey."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["contrast"] = "contrast"
    factor: Annotated[float, NotBool, Field(ge=0, le=4)] = 1.2


class Sharpness(BaseModel):
    """Blend towards a sharpened (factor > 1) or a smoothed (factor < 1) copy; 1 leaves the image as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    op: Literal["sharpness"] = "sharpness"
    factor: Annotated[float, NotBool, Field(ge=0, le=4)] = 1.5


OP_NAMES = ("autocontrast", "unsharp_mask", "contrast", "sharpness")


def _op_name(value: Any) -> Any:
    return value.get("op") if isinstance(value, dict) else getattr(value, "op", None)


# A callable discriminator, because pydantic applies a custom error to an unknown or missing tag only then.
Operation = Annotated[
    Annotated[Autocontrast, Tag("autocontrast")]
    | Annotated[UnsharpMask, Tag("unsharp_mask")]
    | Annotated[Contrast, Tag("contrast")]
    | Annotated[Sharpness, Tag("sharpness")],
    Discriminator(
        _op_name,
        custom_error_type="unknown_operation",
        custom_error_message=f"unknown or missing operation 'op': use one of {', '.join(OP_NAMES)}",
    ),
]
"""One enhancement step, named by ``op``; its parameters are checked against that operation's bounds."""


class Rendition(BaseModel):
    """One output of every sample: a named target size, how the sample fits it, and enhancement steps.

    The sample is resized (``fit``, ``resample``), then ``ops`` run in order on the resized image, then ``pad``
    adds the background (which the operations never touch). The same sample and rendition give the same pixels.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "examples": [
                {"name": "square", "size": 1080, "fit": "cover"},
                {"name": "tile", "width": 800, "height": 1000, "fit": "pad", "background": "#ffffff"},
            ]
        },
    )

    name: Annotated[str, Field(pattern=RENDITION_NAME_PATTERN)] = Field(
        description="Names the rendition's objects, <index>-<name>.<ext>: 1-32 of a-z, 0-9 and '_'."
    )
    size: Side | None = Field(default=None, description="A square box of this side; instead of width/height.")
    width: Side | None = Field(default=None, description="Box width; alone, the height follows the aspect ratio.")
    height: Side | None = Field(default=None, description="Box height; alone, the width follows the aspect ratio.")
    fit: Fit = "contain"
    background: str = Field(
        default="#ffffff", description="Pad colour, #rrggbb or #rgb; a grey keeps a grey sample one channel."
    )
    resample: Resample = "lanczos"
    ops: list[Operation] = Field(
        default_factory=list, max_length=MAX_OPS, description="Enhancement steps, in order, on the resized image."
    )

    @field_validator("background")
    @classmethod
    def _hex_colour(cls, value: str) -> str:
        match = _COLOUR.fullmatch(value)
        if match is None:
            raise ValueError(f"background must be a colour as #rrggbb or #rgb, not {value!r}")
        digits = match["hex"].lower()
        return "#" + ("".join(c * 2 for c in digits) if len(digits) == 3 else digits)

    @model_validator(mode="after")
    def _one_box(self) -> Rendition:
        if self.size is not None and (self.width is not None or self.height is not None):
            raise ValueError("give size (a square), or width and/or height, not both")
        if self.size is None and self.width is None and self.height is None:
            raise ValueError("give a target size: size, or width and/or height")
        if self.fit != "contain" and (self.width is None) != (self.height is None):
            raise ValueError(f"fit {self.fit!r} fills a box: give both width and height (or size)")
        return self

    def box(self) -> tuple[int | None, int | None]:
        """The target box ``(width, height)``; one side None when only the other was given."""
        return (self.size, self.size) if self.size is not None else (self.width, self.height)

    def rgb(self) -> tuple[int, int, int]:
        """The background colour as (r, g, b)."""
        return int(self.background[1:3], 16), int(self.background[3:5], 16), int(self.background[5:7], 16)


def scaled_size(width: int, height: int, rendition: Rendition) -> tuple[int, int]:
    """The size a ``width`` x ``height`` sample is resized to before any crop or pad (at least 1 x 1)."""
    box_w, box_h = rendition.box()
    scale_w = box_w / width if box_w is not None else None
    scale_h = box_h / height if box_h is not None else None
    if scale_w is None or scale_h is None:
        scale = scale_w if scale_w is not None else scale_h
    elif rendition.fit == "cover":
        scale = max(scale_w, scale_h)
    else:
        scale = min(scale_w, scale_h)
    assert scale is not None  # a rendition always has a side (Rendition._one_box)
    # The box side exactly where it binds (no float rounding to 1079), the other side rounded.
    out_w = box_w if box_w is not None and scale == scale_w else max(1, round(width * scale))
    out_h = box_h if box_h is not None and scale == scale_h else max(1, round(height * scale))
    return out_w, out_h


def output_size(width: int, height: int, rendition: Rendition) -> tuple[int, int]:
    """The exact size of ``rendition`` of a ``width`` x ``height`` sample: the box for ``cover`` and ``pad``, the
    scaled sample for ``contain``."""
    if rendition.fit == "contain":
        return scaled_size(width, height, rendition)
    box_w, box_h = rendition.box()
    assert box_w is not None and box_h is not None  # cover and pad have both sides (Rendition._one_box)
    return box_w, box_h


def check_renditions(renditions: list[Rendition] | None) -> list[Rendition] | None:
    """Refuse an empty list and repeated names (each names its objects)."""
    if renditions is None:
        return None
    if not renditions:
        raise ValueError("renditions must list at least one rendition (leave it out for the model's own size)")
    names = [r.name for r in renditions]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"rendition names must be unique: {', '.join(repeated)} repeated")
    return renditions


class RenditionRef(BaseModel):
    """One stored rendition of an output image."""

    name: str
    key: str
    sha256: str
    width: int
    height: int
    member: str | None = None  # file inside the tar at ``key`` (webdataset output)
    url: str | None = None  # GET URL, filled in when a client asks for it
