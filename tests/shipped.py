"""The shipped fmnist-cgan as tests see it, read from models/zoo (its version folders and ``latest``): shipping a
version changes no test."""

from __future__ import annotations

import json
from pathlib import Path

ZOO = Path(__file__).resolve().parents[1] / "models" / "zoo"
CGAN = "fmnist-cgan"
CGAN_VERSIONS = tuple(sorted((p.name for p in (ZOO / CGAN).iterdir() if p.is_dir()), key=int))
CGAN_LATEST: str = json.loads((ZOO / CGAN / "aliases.json").read_text())["latest"]
CGAN_LATEST_REF = f"{CGAN}@{CGAN_LATEST}"
