"""A throwaway C2PA signing chain (a CA and an ES256 leaf, made with ``cryptography``) and reading Content Credentials
back with ``c2pa.Reader``, for the tests of ``provenance: "c2pa"``.

The leaf has what C2PA asks of a signing certificate: not a CA, the digitalSignature key usage and an extended key
usage C2PA accepts (emailProtection). The CA is the trust anchor a reader is given to call the chain trusted.
"""

from __future__ import annotations

import datetime
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LEAF_NAME = "genq test signer"
ORGANIZATION = "genq tests"


@dataclass(frozen=True)
class SigningChain:
    """Files of a test chain: the leaf's key (PKCS#8 PEM), the chain (leaf then CA, PEM), and the CA alone."""

    key_file: Path
    chain_file: Path
    anchor_pem: str  # the CA certificate: the trust anchor

    def env(self) -> dict[str, str]:
        """The worker settings that sign with this chain."""
        return {"GENQ_C2PA__KEY_FILE": str(self.key_file), "GENQ_C2PA__CERT_CHAIN_FILE": str(self.chain_file)}


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        ]
    )


def _key_usage(*, signs: bool) -> x509.KeyUsage:
    flags = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    if signs:
        flags["digital_signature"] = True
    else:
        flags["key_cert_sign"] = flags["crl_sign"] = True
    return x509.KeyUsage(**flags)


def make_chain(folder: Path, *, expired: bool = False) -> SigningChain:
    """Write a fresh CA + ES256 (P-256) leaf chain into ``folder``, valid from yesterday for 30 days (``expired``:
    until yesterday)."""
    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    valid = {
        "not_valid_before": now - (31 if expired else 1) * day,
        "not_valid_after": now - day if expired else now + 30 * day,
    }
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(issuer_name=_name("genq test CA"), subject_name=_name("genq test CA"), **valid)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder(issuer_name=ca.subject, subject_name=_name(LEAF_NAME), **valid)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_file, chain_file = folder / "signer.key", folder / "chain.pem"
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    anchor = ca.public_bytes(serialization.Encoding.PEM)
    chain_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM) + anchor)
    return SigningChain(key_file, chain_file, anchor.decode())


@dataclass(frozen=True)
class Credentials:
    """What ``c2pa.Reader`` reads from an image: the validation state, the failure codes and the active manifest."""

    state: str  # "Trusted" (valid and chained to the anchor), "Valid" (valid, anchor not given) or "Invalid"
    failures: list[str]
    manifest: dict[str, Any]

    def assertion(self, label: str) -> dict[str, Any]:
        [found] = [a["data"] for a in self.manifest["assertions"] if a["label"] == label]
        return dict(found)


def read_credentials(data: bytes, content_type: str, anchor_pem: str | None = None) -> Credentials:
    """Read and validate the Content Credentials in ``data``; with ``anchor_pem``, trusting that CA."""
    import c2pa

    context = None
    if anchor_pem is not None:
        context = c2pa.Context.from_dict({"verify": {"verify_trust": True}, "trust": {"trust_anchors": anchor_pem}})
    reader = c2pa.Reader(content_type, io.BytesIO(data), context=context)
    results = reader.get_validation_results() or {}
    failures = [entry["code"] for entry in results.get("activeManifest", {}).get("failure", [])]
    state = reader.get_validation_state() or ""
    manifest = reader.get_active_manifest() or {}
    return Credentials(state, failures, json.loads(json.dumps(manifest)))
