"""Content Credentials: outputs of ``provenance: "c2pa"`` jobs carry a signed C2PA manifest that ``c2pa.Reader``
validates and reads back; unsigned outputs stay as they were."""

from __future__ import annotations

import io
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import c2pa
import numpy as np
import pytest
from c2pa_chain import LEAF_NAME, SigningChain, make_chain, read_credentials
from PIL import Image
from tiny_model import TINY_NAME, make_tiny_model

from producer.contract import GenerateJob, LabelCount, OutputFormat, Rendition
from producer.errors import ConfigurationError
from worker.catalog.registry import ModelRegistry
from worker.embedded import LocalReporter
from worker.errors import SigningUnavailable
from worker.generate.credentials import (
    GENERATION_ASSERTION,
    NOT_CONFIGURED,
    Claim,
    ContentSigner,
    NoSigner,
    Signer,
    load_signer,
)
from worker.generate.encode import IPTC_TRAINED_ALGORITHMIC, encode_image, provenance
from worker.generate.inference import InferenceEngine
from worker.generate.pipeline import GenerateResult, run_generate
from worker.settings import C2paSettings
from worker.storage.local import LocalStorage

CLAIM = Claim(model="fmnist-cgan", version="1", label="sneaker", seed=123)
INFO = provenance(generator="fmnist-cgan", version="fmnist-cgan@1", label="sneaker", seed=123)


def _image(channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(channels, 28, 28), dtype=np.uint8)


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def signer(c2pa_chain: SigningChain) -> ContentSigner:
    loaded = load_signer(C2paSettings(key_file=c2pa_chain.key_file, cert_chain_file=c2pa_chain.chain_file))
    assert isinstance(loaded, ContentSigner), getattr(loaded, "reason", loaded)
    return loaded


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_signed_output_reads_back_with_a_valid_signature_and_its_claim(
    signer: ContentSigner, c2pa_chain: SigningChain, fmt: OutputFormat, channels: int
) -> None:
    unsigned = encode_image(_image(channels), fmt, INFO)

    signed = signer.sign(unsigned, fmt, CLAIM)

    read = read_credentials(signed, fmt.content_type, c2pa_chain.anchor_pem)
    assert (read.state, read.failures) == ("Trusted", [])
    [action] = read.assertion("c2pa.actions.v2")["actions"]
    assert action["action"] == "c2pa.created"
    assert action["digitalSourceType"] == IPTC_TRAINED_ALGORITHMIC
    assert action["softwareAgent"] == {"name": "fmnist-cgan", "version": "1"}
    assert read.manifest["claim_generator_info"][0]["name"] == "fmnist-cgan"
    assert read.manifest["claim_generator_info"][0]["version"] == "1"
    generation = read.assertion(GENERATION_ASSERTION)
    assert (generation["model"], generation["version"]) == ("fmnist-cgan", "fmnist-cgan@1")
    assert (generation["label"], generation["seed"]) == ("sneaker", 123)
    assert read.manifest["signature_info"]["common_name"] == LEAF_NAME
    assert "thumbnail" not in read.manifest  # none: it would outweigh a small image
    assert np.array_equal(_pixels(signed), _pixels(unsigned))  # the pixels are untouched


def test_without_the_trust_anchor_the_only_failure_is_an_untrusted_signer(
    signer: ContentSigner, c2pa_chain: SigningChain
) -> None:
    signed = signer.sign(encode_image(_image(), OutputFormat.PNG, INFO), OutputFormat.PNG, CLAIM)

    read = read_credentials(signed, "image/png")

    assert read.state == "Valid" and read.failures == ["signingCredential.untrusted"]


def _payload_offset(data: bytes, fmt: OutputFormat) -> int:
    """Where the image data proper starts: PNG's first IDAT chunk, JPEG's entropy-coded scan, WebP's VP8L chunk.
    Found by walking the container's structure (the manifest's bytes may hold any marker)."""
    if fmt is OutputFormat.PNG:
        pos = 8
        while True:
            (length,) = struct.unpack(">I", data[pos : pos + 4])
            if data[pos + 4 : pos + 8] == b"IDAT":
                return pos + 8
            pos += 12 + length
    if fmt is OutputFormat.JPEG:
        pos = 2
        while True:
            marker, (length,) = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])
            if marker == 0xDA:  # start of scan: its header, then the pixels
                return pos + 2 + length
            pos += 2 + length
    pos = 12
    while True:
        chunk, (length,) = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])
        if chunk in (b"VP8L", b"VP8 "):
            return pos + 8
        pos += 8 + length + (length & 1)


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_a_signed_image_whose_pixel_bytes_change_fails_validation(
    signer: ContentSigner, c2pa_chain: SigningChain, fmt: OutputFormat
) -> None:
    signed = signer.sign(encode_image(_image(), fmt, INFO), fmt, CLAIM)
    tampered = bytearray(signed)
    start = _payload_offset(signed, fmt)
    for i in range(start + 8, start + 16):
        tampered[i] ^= 0xFF

    read = read_credentials(bytes(tampered), fmt.content_type, c2pa_chain.anchor_pem)

    assert read.state == "Invalid"
    assert "assertion.dataHash.mismatch" in read.failures
    assert read_credentials(signed, fmt.content_type, c2pa_chain.anchor_pem).failures == []  # the control


def test_two_signings_of_one_image_differ_in_bytes_but_not_in_pixels_or_claim(
    signer: ContentSigner, c2pa_chain: SigningChain
) -> None:
    # Each claim has a fresh id and salted hashes, and ECDSA signatures are randomised: container bytes differ.
    unsigned = encode_image(_image(), OutputFormat.PNG, INFO)
    first, second = (signer.sign(unsigned, OutputFormat.PNG, CLAIM) for _ in range(2))

    assert first != second
    assert np.array_equal(_pixels(first), _pixels(second))
    reads = [read_credentials(data, "image/png", c2pa_chain.anchor_pem) for data in (first, second)]
    assert [r.failures for r in reads] == [[], []]
    assert reads[0].assertion(GENERATION_ASSERTION) == reads[1].assertion(GENERATION_ASSERTION)


def test_one_signer_signs_from_many_threads_at_once(signer: ContentSigner, c2pa_chain: SigningChain) -> None:
    images = [encode_image(_image(), OutputFormat.JPEG, INFO) for _ in range(24)]
    claims = [Claim("fmnist-cgan", "1", "bag", seed) for seed in range(24)]

    with ThreadPoolExecutor(8) as pool:
        signed = list(pool.map(lambda data, claim: signer.sign(data, OutputFormat.JPEG, claim), images, claims))

    reads = [read_credentials(data, "image/jpeg", c2pa_chain.anchor_pem) for data in signed]
    assert all(r.failures == [] for r in reads)
    assert [r.assertion(GENERATION_ASSERTION)["seed"] for r in reads] == list(range(24))


# Loading: once per process, from files or PEM text; what cannot sign says why.


def test_a_signer_loads_from_pem_text_as_from_files(c2pa_chain: SigningChain) -> None:
    settings = C2paSettings(
        key=c2pa_chain.key_file.read_text(),  # type: ignore[arg-type]
        cert_chain=c2pa_chain.chain_file.read_text(),
    )
    signer = load_signer(settings)
    assert isinstance(signer, ContentSigner)
    assert "ES256, chain of 2 certificates" in signer.describe()


def test_no_key_configured_gives_a_signer_that_says_how_to_set_one() -> None:
    assert load_signer(C2paSettings()) is NOT_CONFIGURED
    with pytest.raises(SigningUnavailable, match="GENQ_C2PA__KEY_FILE"):
        NOT_CONFIGURED.ready()


def test_without_c2pa_python_a_configured_worker_says_it_is_missing(
    c2pa_chain: SigningChain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "c2pa", None)  # `import c2pa` raises ImportError, as on a worker without it
    signer = load_signer(C2paSettings(key_file=c2pa_chain.key_file, cert_chain_file=c2pa_chain.chain_file))
    assert isinstance(signer, NoSigner)
    assert "c2pa-python is not installed" in signer.reason and "genq[c2pa]" in signer.reason


def test_a_key_of_another_chain_does_not_load(c2pa_chain: SigningChain, tmp_path: Path) -> None:
    other = make_chain(tmp_path / "other")
    signer = load_signer(C2paSettings(key_file=other.key_file, cert_chain_file=c2pa_chain.chain_file))
    assert isinstance(signer, NoSigner) and "C2PA key" in signer.reason


def test_an_expired_certificate_does_not_load(tmp_path: Path) -> None:
    expired = make_chain(tmp_path / "expired", expired=True)
    signer = load_signer(C2paSettings(key_file=expired.key_file, cert_chain_file=expired.chain_file))
    assert isinstance(signer, NoSigner) and "not valid at time of signing" in signer.reason


def test_an_unreadable_key_file_is_named(c2pa_chain: SigningChain, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.key"
    signer = load_signer(C2paSettings(key_file=missing, cert_chain_file=c2pa_chain.chain_file))
    assert isinstance(signer, NoSigner)
    assert f"GENQ_C2PA__KEY_FILE={missing}" in signer.reason


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"key_file": "k.pem"}, "GENQ_C2PA__CERT_CHAIN_FILE"),
        ({"cert_chain": "PEM"}, "GENQ_C2PA__KEY_FILE"),
        ({"key_file": "k.pem", "key": "PEM", "cert_chain": "PEM"}, "not both"),
        ({"key": "PEM", "cert_chain": "PEM", "tsa_url": "tsa.example"}, "GENQ_C2PA__TSA_URL"),
    ],
)
def test_incomplete_signing_settings_are_refused_naming_the_setting(fields: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        C2paSettings.model_validate(fields)


# In the pipeline: only c2pa jobs are signed; the others' bytes are what they were.


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    root = tmp_path_factory.mktemp("zoo")
    make_tiny_model(root)
    engine = InferenceEngine(ModelRegistry([root]).load, max_batch=4, max_wait_s=0.001)
    yield engine
    engine.close()


def _job(fmt: OutputFormat, provenance: str) -> GenerateJob:
    return GenerateJob(
        job_id="job-c2pa-0001",
        model=TINY_NAME,
        model_name=TINY_NAME,
        model_version="1",
        items=[LabelCount(index=8, name="bag", count=6)],
        seed=42,
        format=fmt,
        provenance=provenance,  # type: ignore[arg-type]
        created_at=datetime(2026, 12, 7, tzinfo=UTC),
    )


def _run(job: GenerateJob, root: Path, engine: InferenceEngine, signer: Signer) -> tuple[GenerateResult, LocalStorage]:
    storage = LocalStorage(root)
    with ThreadPoolExecutor(4) as uploads:
        result = run_generate(
            job,
            storage=storage,
            sample=engine.submit,
            reporter=LocalReporter(),
            chunk_size=4,
            uploads=uploads,
            signer=signer,
        )
    return result, storage


@pytest.mark.parametrize("fmt", list(OutputFormat))
def test_a_c2pa_job_signs_every_output_and_an_xmp_job_stores_the_encoders_bytes(
    engine: InferenceEngine, signer: ContentSigner, c2pa_chain: SigningChain, tmp_path: Path, fmt: OutputFormat
) -> None:
    plain, plain_storage = _run(_job(fmt, "xmp"), tmp_path / "xmp", engine, signer)
    again, again_storage = _run(_job(fmt, "xmp"), tmp_path / "again", engine, signer)
    signed, signed_storage = _run(_job(fmt, "c2pa"), tmp_path / "c2pa", engine, signer)

    plain_bytes = [plain_storage.get(o.key) for o in plain.outputs]
    assert plain_bytes == [again_storage.get(o.key) for o in again.outputs]  # a rerun: identical bytes
    for data in plain_bytes:  # the signer, though there, left them alone: no manifest at all
        with pytest.raises(c2pa.C2paError):
            read_credentials(data, fmt.content_type)
    assert [o.seed for o in signed.outputs] == [o.seed for o in plain.outputs]
    for ref, plain_data in zip(signed.outputs, plain_bytes, strict=True):
        data = signed_storage.get(ref.key)
        read = read_credentials(data, fmt.content_type, c2pa_chain.anchor_pem)
        assert (read.state, read.failures) == ("Trusted", [])
        generation = read.assertion(GENERATION_ASSERTION)
        assert (generation["label"], generation["seed"], generation["model"]) == ("bag", ref.seed, TINY_NAME)
        assert np.array_equal(_pixels(data), _pixels(plain_data))  # same pixels as the unsigned job's
    assert signed_storage.get("jobs/job-c2pa-0001/manifest.json")  # the job completed


def test_every_rendition_of_a_c2pa_job_is_signed_and_reads_back_with_its_claim(
    engine: InferenceEngine, signer: ContentSigner, c2pa_chain: SigningChain, tmp_path: Path
) -> None:
    renditions = [
        Rendition(name="square", size=64, fit="cover", ops=[{"op": "unsharp_mask"}]),  # type: ignore[list-item]
        Rendition(name="tile", width=80, height=60, fit="pad", background="#ffffff"),
    ]
    job = _job(OutputFormat.PNG, "c2pa").model_copy(update={"renditions": renditions})
    plain_job = job.model_copy(update={"provenance": "xmp"})
    signed, storage = _run(job, tmp_path / "c2pa", engine, signer)
    plain, plain_storage = _run(plain_job, tmp_path / "xmp", engine, signer)
    for ref, plain_ref in zip(signed.outputs, plain.outputs, strict=True):
        assert ref.renditions is not None and plain_ref.renditions is not None
        for rendition, unsigned in zip(ref.renditions, plain_ref.renditions, strict=True):
            data = storage.get(rendition.key)
            read = read_credentials(data, "image/png", c2pa_chain.anchor_pem)
            assert (read.state, read.failures) == ("Trusted", [])
            generation = read.assertion(GENERATION_ASSERTION)
            assert (generation["label"], generation["seed"]) == ("bag", ref.seed)
            assert Image.open(io.BytesIO(data)).size == (rendition.width, rendition.height)
            assert np.array_equal(_pixels(data), _pixels(plain_storage.get(unsigned.key)))  # pixels as unsigned


def test_a_c2pa_job_on_a_worker_that_cannot_sign_fails_before_sampling(engine: InferenceEngine, tmp_path: Path) -> None:
    reporter = LocalReporter()
    calls: list[int] = []
    reporter.on_progress = lambda done, total: calls.append(done)

    with pytest.raises(SigningUnavailable, match="provenance 'c2pa'.*GENQ_C2PA__KEY_FILE"):
        run_generate(
            _job(OutputFormat.PNG, "c2pa"),
            storage=LocalStorage(tmp_path),
            sample=engine.submit,
            reporter=reporter,
            chunk_size=4,
            uploads=ThreadPoolExecutor(1),
            signer=NOT_CONFIGURED,
        )
    assert calls == [] and not any(tmp_path.iterdir())  # never started, nothing stored
