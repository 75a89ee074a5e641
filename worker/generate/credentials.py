"""Content Credentials: a signed C2PA manifest in each output of a job asking for ``provenance: "c2pa"``.

The manifest says what made the image, in the terms C2PA readers (Adobe's Content Credentials, c2patool, platforms'
"AI info" labels) look for: a ``c2pa.actions`` assertion whose ``c2pa.created`` action has the IPTC digital source
type ``trainedAlgorithmicMedia`` and the model as its software agent, and a ``dev.genq.generation`` assertion with
the model, version, label and seed. The claim is signed with the deployment's key and certificate chain
(``GENQ_C2PA__*``, :class:`~worker.settings.C2paSettings`) and embedded in the PNG, JPEG or WebP bytes that
:mod:`worker.generate.encode` made; the pixels are untouched.

Signing is not deterministic: each claim gets a fresh id and salted hashes, and ECDSA signatures are randomised, so a
rerun stores the same pixels in different container bytes (docs/provenance.md). ``c2pa-python`` is optional
(``pip install 'genq[c2pa]'``): it is imported only when a signer is loaded, and a worker without it, or without a
key, fails the jobs that ask for c2pa saying why, and runs every other job.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from producer.contract import OutputFormat
from worker.errors import SigningUnavailable
from worker.generate.encode import IPTC_TRAINED_ALGORITHMIC

if TYPE_CHECKING:
    from worker.settings import C2paSettings

log = logging.getLogger("genq.credentials")

GENERATION_ASSERTION = "dev.genq.generation"  # genq's own assertion: reverse-DNS label, as C2PA asks of custom ones
CREATED = "c2pa.created"
SETUP_HINT = "set GENQ_C2PA__KEY_FILE and GENQ_C2PA__CERT_CHAIN_FILE (docs/provenance.md)"
# No thumbnail in the manifest: c2pa-rs would add a JPEG copy of the image (at 28x28 more bytes than the image, and
# up to 2 MB for a WebP, measured), and the image is its own thumbnail. No verification of every signed image: it
# doubled signing's CPU (2.6 -> 1.3 ms per 28 px JPEG, measured); the signer verifies its test image when it loads.
_BUILDER_SETTINGS = {"builder": {"thumbnail": {"enabled": False}}, "verify": {"verify_after_sign": False}}
# What reading the test image may report: a chain whose CA the reader was not told to trust signs correctly.
_ACCEPTED_AT_LOAD = {"signingCredential.untrusted"}


@dataclass(frozen=True)
class Claim:
    """What an output's Content Credentials state: the model version that made it, its label and its seed."""

    model: str  # the catalogue key: "fmnist-cgan", or "acme/brand-x" for a tenant's model
    version: str  # "1"
    label: str
    seed: int


def manifest_definition(claim: Claim) -> dict[str, Any]:
    """The C2PA manifest definition (c2pa ``Builder`` JSON) of one output: the model as claim generator and as the
    ``c2pa.created`` action's software agent, the IPTC digital source type, and the generation assertion."""
    agent = {"name": claim.model, "version": claim.version}
    return {
        "claim_generator_info": [agent],
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {"action": CREATED, "digitalSourceType": IPTC_TRAINED_ALGORITHMIC, "softwareAgent": agent}
                    ]
                },
            },
            {
                "label": GENERATION_ASSERTION,
                "data": {
                    "generator": "genq",
                    "model": claim.model,
                    "version": f"{claim.model}@{claim.version}",
                    "label": claim.label,
                    "seed": claim.seed,
                },
            },
        ],
    }


class Signer(Protocol):
    """Signs encoded outputs; the pipeline calls it for jobs with ``provenance: "c2pa"``."""

    def ready(self) -> None:
        """Raise :class:`SigningUnavailable` (saying why) if this signer cannot sign."""
        ...

    def sign(self, data: bytes, fmt: OutputFormat, claim: Claim) -> bytes:
        """``data`` (an image encoded as ``fmt``) with a signed C2PA manifest stating ``claim`` embedded."""
        ...


@dataclass(frozen=True)
class NoSigner:
    """The signer of a worker that cannot sign: every c2pa job fails with ``reason``."""

    reason: str

    def ready(self) -> None:
        raise SigningUnavailable(f"this job asks for provenance 'c2pa', but {self.reason}")

    def sign(self, data: bytes, fmt: OutputFormat, claim: Claim) -> bytes:
        self.ready()
        raise AssertionError("unreachable")  # pragma: no cover


NOT_CONFIGURED = NoSigner(f"no C2PA signing key is configured: {SETUP_HINT}")


class ContentSigner:
    """Signs with one key and chain: c2pa's ``Signer`` (the parsed key and chain) and ``Context`` are built once per
    process and shared by the upload threads; each image gets its own single-use ``Builder``."""

    def __init__(self, settings: C2paSettings) -> None:
        """Load the key and chain of ``settings`` and sign a test image with them.

        Raises:
            SigningUnavailable: c2pa-python is not installed, or the key or chain cannot be read or does not sign
                (the message says which, never the key).
        """
        try:
            import c2pa
        except ImportError as exc:
            raise SigningUnavailable("c2pa-python is not installed on this worker: pip install 'genq[c2pa]'") from exc
        self._c2pa = c2pa
        chain = _pem(settings.cert_chain, settings.cert_chain_file, "certificate chain", "CERT_CHAIN")
        key = _pem(
            settings.key.get_secret_value() if settings.key is not None else None, settings.key_file, "key", "KEY"
        )
        self.alg = settings.alg
        self.tsa_url = settings.tsa_url
        self.certificates = chain.count(b"-----BEGIN CERTIFICATE-----")
        try:
            info = c2pa.C2paSignerInfo(settings.alg.encode(), chain, key, settings.tsa_url)
            self._signer = c2pa.Signer.from_info(info)
            self._context = c2pa.Context.from_dict(_BUILDER_SETTINGS)
        except (c2pa.C2paError, ValueError) as exc:
            raise SigningUnavailable(f"the C2PA key or certificate chain does not load: {exc}") from exc
        self._self_test()

    def _self_test(self) -> None:
        """Sign a test image and validate it: a key that does not match the chain, or a certificate C2PA refuses,
        fails here, when the signer loads, not on a job."""
        c2pa = self._c2pa
        try:
            signed = self.sign(_PROBE_PNG, OutputFormat.PNG, Claim("genq-self-test", "0", "probe", 0))
            results = c2pa.Reader("image/png", io.BytesIO(signed)).get_validation_results() or {}
        except (SigningUnavailable, c2pa.C2paError) as exc:
            raise SigningUnavailable(f"the C2PA key and certificate chain do not sign: {exc}") from exc
        failures = {entry["code"] for entry in results.get("activeManifest", {}).get("failure", [])}
        if failures - _ACCEPTED_AT_LOAD:
            problems = ", ".join(sorted(failures - _ACCEPTED_AT_LOAD))
            raise SigningUnavailable(f"the C2PA key and certificate chain sign images that do not validate: {problems}")

    def ready(self) -> None:
        pass

    def sign(self, data: bytes, fmt: OutputFormat, claim: Claim) -> bytes:
        c2pa = self._c2pa
        dest = io.BytesIO()
        try:
            builder = c2pa.Builder(manifest_definition(claim), self._context)
            builder.sign(self._signer, fmt.content_type, io.BytesIO(data), dest)
        except c2pa.C2paError as exc:
            raise SigningUnavailable(f"C2PA signing failed: {exc}") from exc
        return dest.getvalue()

    def describe(self) -> str:
        """One line for the worker's start: what signs (never the key)."""
        tsa = f", time-stamped by {self.tsa_url}" if self.tsa_url else ""
        return f"C2PA signing configured ({self.alg.upper()}, chain of {self.certificates} certificates{tsa})"


def load_signer(settings: C2paSettings) -> Signer:
    """The process's signer: a :class:`ContentSigner` when a key and chain are configured and load, else a
    :class:`NoSigner` that says why (no key set, c2pa-python missing, a key or chain that does not load)."""
    if not settings.configured:
        return NOT_CONFIGURED
    try:
        return ContentSigner(settings)
    except SigningUnavailable as exc:
        log.error("jobs asking for provenance 'c2pa' will fail: %s", exc)
        return NoSigner(str(exc))


def _pem(text: str | None, path: Any, what: str, variable: str) -> bytes:
    if text is not None:
        return text.encode()
    try:
        return bytes(path.read_bytes())
    except OSError as exc:
        raise SigningUnavailable(
            f"cannot read the C2PA {what} GENQ_C2PA__{variable}_FILE={path}: {exc.strerror}"
        ) from exc


# A 1x1 grey PNG: what a loaded key signs once, so that a key or chain that cannot sign is found at start.
_PROBE_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010800000000"
    "3a7e9b550000000a49444154789c636000000002000148afa4710000000049454e44ae426082"
)
