"""What Content Credentials (``provenance: "c2pa"``) cost per image: encoding unsigned vs encoding and signing.

    python -m benchmarks.c2pa_cost [--images 200]

For the shipped 28x28 greyscale model and the 64x64 RGB configuration (random weights: the same pixel count and
channels as a trained one), it samples ``--images`` images at the model's native size, then for PNG, JPEG and WebP:
encodes each the way the worker does (XMP and text fields), and encodes and signs each (ES256, a throwaway CA + leaf
chain made here with ``cryptography``, no time-stamp authority). Per format it reports the wall-clock ms and the CPU
ms per image of both, the bytes signing adds, and whether two signings of one image give the same bytes and the
same pixels. It also reports what loading the signer costs once per worker process. One thread, so wall-clock and
CPU time compare. Prints a table, then one ``name=value`` line per figure. Nothing here is asserted.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.throughput import make_model
from producer.contract import OutputFormat
from worker.generate.credentials import Claim, ContentSigner
from worker.generate.encode import encode_image, provenance
from worker.settings import C2paSettings


def make_chain(folder: Path) -> tuple[Path, Path]:
    """(key file, chain file) of a fresh CA + ES256 leaf with the extensions C2PA asks of a signing certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None, ca_key: ec.EllipticCurvePrivateKey
    ) -> x509.Certificate:
        ca = issuer is None  # the CA signs itself
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        usage = dict.fromkeys(
            ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "encipher_only"), False
        )
        builder = (
            x509.CertificateBuilder(subject_name=name, issuer_name=issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, decipher_only=False, **usage),
                critical=True,
            )
        )
        if not ca:  # C2PA wants an EKU it knows on the signing certificate, and the key ids linking it to its issuer
            builder = (
                builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            )
        return builder.sign(ca_key, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("genq benchmark CA", ca_key, None, ca_key)
    leaf = certificate("genq benchmark signer", leaf_key, ca.subject, ca_key)
    key_file, chain_file = folder / "signer.key", folder / "chain.pem"
    pem = serialization.Encoding.PEM
    key_file.write_bytes(leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    chain_file.write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    return key_file, chain_file


def sample_images(size: int, count: int) -> tuple[str, list[np.ndarray]]:
    """``count`` uint8 (C, H, W) images of the ``size`` model, at its native size."""
    from models.generator import load_generator

    name, directory = make_model(size, Path(tempfile.mkdtemp(prefix="genq-c2pa-")))
    model = load_generator(directory, "cpu")
    images = model.sample([i % 10 for i in range(count)], list(range(count))).numpy()
    return name, list(images)


def per_image_ms(work: list[np.ndarray], run: Callable[[np.ndarray], object]) -> tuple[float, float]:
    """(median wall-clock ms, mean CPU ms) per call of ``run`` over ``work``."""
    walls = []
    cpu = time.process_time()
    for item in work:
        started = time.perf_counter()
        run(item)
        walls.append((time.perf_counter() - started) * 1000)
    return statistics.median(walls), (time.process_time() - cpu) * 1000 / len(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="images per model and format")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="genq-c2pa-chain-"))
    key_file, chain_file = make_chain(folder)
    settings = C2paSettings(key_file=key_file, cert_chain_file=chain_file)
    started, cpu = time.perf_counter(), time.process_time()
    signer = ContentSigner(settings)  # what a worker process does once (with the test signature it makes)
    load_ms, load_cpu_ms = (time.perf_counter() - started) * 1000, (time.process_time() - cpu) * 1000

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"{args.images} images per model and format, one thread; ES256, chain of 2 certificates, no TSA")
    print(f"signer load (once per process): {load_ms:.1f} ms wall, {load_cpu_ms:.1f} ms CPU\n")
    header = (
        f"{'model':<21}{'format':<7}{'unsigned ms':>12}{'signed ms':>10}{'unsigned cpu':>13}{'signed cpu':>11}"
        f"{'bytes':>8}{'+bytes':>8}{'same bytes':>11}{'same pixels':>12}"
    )
    print(header)
    figures: dict[str, float] = {"signer_load_ms": load_ms}
    for size in (28, 64):
        name, images = sample_images(size, args.images)
        info = provenance(generator=name, version=f"{name}@1", label="sneaker", seed=1)
        claim = Claim(name, "1", "sneaker", 1)
        shape = "x".join(str(d) for d in images[0].shape[1:]) + ("" if images[0].shape[0] == 3 else " L")
        for fmt in OutputFormat:
            encoded = [encode_image(image, fmt, info) for image in images]

            def unsigned(image: np.ndarray, fmt: OutputFormat = fmt, info: dict[str, str] = info) -> bytes:
                return encode_image(image, fmt, info)

            def signed_(
                image: np.ndarray, fmt: OutputFormat = fmt, info: dict[str, str] = info, claim: Claim = claim
            ) -> bytes:
                return signer.sign(encode_image(image, fmt, info), fmt, claim)

            unsigned_ms, unsigned_cpu = per_image_ms(images, unsigned)
            signed_ms, signed_cpu = per_image_ms(images, signed_)
            signed = [signer.sign(data, fmt, claim) for data in encoded[:20]]
            again = [signer.sign(data, fmt, claim) for data in encoded[:20]]
            same_bytes = sum(a == b for a, b in zip(signed, again, strict=True)) / len(signed)
            same_pixels = sum(
                np.array_equal(np.asarray(Image.open(io.BytesIO(a))), np.asarray(Image.open(io.BytesIO(u))))
                for a, u in zip(again, encoded, strict=False)
            ) / len(again)
            size_unsigned = statistics.mean(len(d) for d in encoded)
            added = statistics.mean(len(s) for s in signed) - statistics.mean(len(d) for d in encoded[:20])
            print(
                f"{name + ' ' + shape:<21}{fmt.value:<7}{unsigned_ms:>12.2f}{signed_ms:>10.2f}{unsigned_cpu:>13.2f}"
                f"{signed_cpu:>11.2f}{size_unsigned:>8.0f}{added:>8.0f}{same_bytes:>11.2f}{same_pixels:>12.2f}"
            )
            key = f"{size}px_{fmt.value}"
            figures |= {
                f"{key}_unsigned_ms": unsigned_ms,
                f"{key}_signed_ms": signed_ms,
                f"{key}_unsigned_cpu_ms": unsigned_cpu,
                f"{key}_signed_cpu_ms": signed_cpu,
                f"{key}_bytes_unsigned": size_unsigned,
                f"{key}_bytes_added": added,
                f"{key}_resign_same_bytes": same_bytes,
                f"{key}_resign_same_pixels": same_pixels,
            }
    print()
    for name, value in figures.items():
        print(f"{name}={value:.2f}")


if __name__ == "__main__":
    main()
