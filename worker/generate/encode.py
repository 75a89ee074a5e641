"""Image encoding with provenance: every output says which generator, version, label and seed made it.

Encoders are deterministic: the same pixels and provenance give the same bytes, so a rerun rewrites identical
objects.
"""

from __future__ import annotations

import io
import json
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from producer.contract import OutputFormat

# IPTC digital source type for media created by a trained model: the marker provenance checkers look for.
IPTC_TRAINED_ALGORITHMIC = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_PNG_KEYWORD = "XML:com.adobe.xmp"  # the iTXt keyword PNG readers take XMP from


def provenance(*, generator: str, version: str, label: str, seed: int) -> dict[str, str]:
    """Text fields embedded in every output.

    No job id: an image is a pure function of (model version, label, seed, format), so the same request run twice
    stores byte-identical objects. The manifest ties images to their job.
    """
    return {
        "Software": "genq",
        "genq:generator": generator,
        "genq:version": version,
        "genq:label": label,
        "genq:seed": str(seed),
        "AI-generated": "true",
        "DigitalSourceType": IPTC_TRAINED_ALGORITHMIC,
    }


def _to_pil(image: np.ndarray) -> Image.Image:
    """uint8 (C, H, W) with C in {1, 3} -> PIL image."""
    hwc = np.ascontiguousarray(image.transpose(1, 2, 0))  # (H, W, C)
    return Image.fromarray(hwc[:, :, 0], mode="L") if hwc.shape[2] == 1 else Image.fromarray(hwc, mode="RGB")


def encode_image(image: np.ndarray, fmt: OutputFormat, info: dict[str, str]) -> bytes:
    """Encode one uint8 (C, H, W) image as ``fmt`` with ``info`` embedded as metadata: as XMP in every format (the
    IPTC digital source type and the genq fields), and as PNG text chunks or a JPEG comment besides."""
    pil = _to_pil(image)
    buf = io.BytesIO()
    xmp = _xmp(info)  # where provenance tools look (exiftool: XMP-iptcExt:DigitalSourceType), in every format
    if fmt is OutputFormat.PNG:
        png_info = PngInfo()
        for key, value in info.items():
            png_info.add_text(key, value)
        png_info.add_itxt(XMP_PNG_KEYWORD, xmp.decode())  # iTXt, uncompressed, as the XMP specification asks
        pil.save(buf, format="PNG", pnginfo=png_info, compress_level=6)
    elif fmt is OutputFormat.JPEG:
        # XMP in an APP1 segment ("http://ns.adobe.com/xap/1.0/\0" header, written by Pillow), the fields as a comment
        pil.save(buf, format="JPEG", quality=92, comment=json.dumps(info, sort_keys=True).encode(), xmp=xmp)
    else:
        pil.save(buf, format="WEBP", lossless=True, xmp=xmp)
    return buf.getvalue()


def _xmp(info: dict[str, str]) -> bytes:
    """An XMP packet carrying the IPTC digital source type and the genq fields."""
    tags = "".join(
        f"<genq:{name}>{escape(value)}</genq:{name}>"
        for name, value in ((k.removeprefix("genq:").replace("-", "_"), v) for k, v in info.items())
        if name != "DigitalSourceType"
    )
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
        'xmlns:genq="https://genq.dev/ns/1.0/">'
        f"<Iptc4xmpExt:DigitalSourceType>{IPTC_TRAINED_ALGORITHMIC}</Iptc4xmpExt:DigitalSourceType>{tags}"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
    ).encode()
