"""Settings of a worker process, from ``GENQ_*`` variables; built once at start-up and passed down."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator

from producer.core.settings import DEV_WEBHOOK_SECRET, GenqSettings
from producer.errors import ConfigurationError
from worker.memory import MallocPolicy
from worker.retries import RetryPolicy


class BatchingSettings(BaseModel):
    """Dynamic batching: samples of concurrent jobs for the same model share forward passes."""

    max_batch: int = Field(default=64, ge=1, description="Most images in one forward pass (also a job's chunk).")
    max_wait_ms: float = Field(
        default=5.0, ge=0, description="Longest a sample waits for others to fill its forward pass."
    )
    upload_workers: int = Field(default=8, ge=1, description="Threads encoding and uploading outputs per process.")
    max_bulk_shards: int = Field(
        default=4,
        ge=1,
        description=(
            "Shards of more than max_batch images one process runs at once; more wait their turn, so memory stays "
            "flat whatever the job size. Small jobs never wait."
        ),
    )
    bulk_wait_check_s: float = Field(
        default=0.25,
        gt=0,
        description=(
            "How often a bulk shard waiting for a bulk slot looks for messages on queues served before its own; if "
            "one waits, it hands its message back to its queue and its thread serves them (a high job waits about "
            "this long for a thread held by waiting bulk shards)."
        ),
    )


class InferenceSettings(BaseModel):
    """How forward passes run on the worker's device; the defaults (exact fp32, eager, NHWC) suit a CPU.

    NHWC is what oneDNN's and cuDNN's fastest convolutions want: on the CPU it runs the 64x64 generator 1.5x as fast
    as NCHW (306 vs 196 images/s at batch 64 here) and keeps every image byte-identical whatever its batch; an image
    may differ from its NCHW twin by a grey level. On a GPU, ``bf16`` and ``compile_backend="inductor"`` add to the
    fast path; each may move an image by a grey level or two between batch sizes (see models.generator.Acceleration).
    """

    bf16: bool = Field(default=False, description="Autocast convolutions and matmuls to bfloat16.")
    channels_last: bool = Field(default=True, description="NHWC memory layout for weights and activations.")
    compile_backend: str | None = Field(
        default=None, description="torch.compile backend (e.g. inductor), compiled once per batch-size bucket."
    )


class StorageRetrySettings(BaseModel):
    """Retries of transient object-store faults: exponential backoff with jitter inside a time window."""

    window_s: float = Field(
        default=60.0, ge=0, description="A shard gives up this long after its storage calls met an outage (shared)."
    )
    initial_s: float = Field(default=0.5, gt=0)
    max_s: float = Field(default=8.0, gt=0)


class CelerySettings(BaseModel):
    """Broker options. The visibility timeout must exceed the longest job, or Redis redelivers it while it runs."""

    # Longest generate job: max_images_per_job (10,000) at ~125 images/s (docs/benchmarks.md) is ~80 s; an hour leaves a
    # wide margin. A whole-worker crash delays redelivery by this much, so lower it only with shorter jobs.
    visibility_timeout_s: int = Field(default=3600, ge=1)
    max_deliveries: int = Field(
        default=5, ge=1, description="Dead-letter a job whose worker died this many times running it."
    )
    retries: int = Field(
        default=3,
        ge=0,
        description=(
            "Times a job that failed with a transient fault (storage unavailable past its retry window) runs again "
            "before it fails; 0 fails it at once."
        ),
    )
    retry_backoff_s: float = Field(
        default=15.0, ge=0, description="Wait before a job's first retry; doubled for each further one."
    )
    retry_backoff_max_s: float = Field(
        default=300.0, ge=0, description="Longest wait between a job's retries (at most half the visibility timeout)."
    )

    @property
    def retry_policy(self) -> RetryPolicy:
        """The job retry policy these settings describe.

        A retry waits on the broker as an unacked message, and one waiting longer than the visibility timeout would
        be delivered a second time while the first still waits: the wait is capped at half of it.
        """
        cap = min(self.retry_backoff_max_s, self.visibility_timeout_s / 2)
        return RetryPolicy(self.retries, min(self.retry_backoff_s, cap), cap)

    unacked_restore_interval_s: int = Field(
        default=10, ge=1, description="How often kombu looks for unacked messages of dead workers."
    )
    redis_wait_s: float = Field(
        default=60.0,
        ge=0,
        description=(
            "How long a task that lost Redis (the job store and the broker) while running a job waits for it to "
            "answer before it hands the job's message back to its queue; the job is never failed for it."
        ),
    )
    task_events: bool = Field(
        default=False,
        description=(
            "Send Celery task events from the start (-E). Flower turns them on by itself while it runs (its "
            "enable_events option); they cost three Redis publishes per task (0.3 of the worker's 12 ms of CPU per "
            "1-image job, measured)."
        ),
    )


class SweeperSettings(BaseModel):
    """The sweep for jobs whose message the broker lost (``worker.sweeper``), and for running shards whose worker and
    message are gone (``worker.watchdog``): one worker per interval looks."""

    enabled: bool = Field(default=True, description="Run the sweeper thread in this worker.")
    interval_s: float = Field(default=30.0, gt=0, description="How often one worker of the fleet sweeps.")
    stranded_after_s: float = Field(
        default=60.0, ge=0, description="Look only at jobs recorded longer ago than this (a lost job waits that long)."
    )
    confirm_s: float = Field(default=5.0, ge=0, description="A message missing twice, this far apart, is sent again.")
    max_jobs: int = Field(default=1000, ge=1, description="Oldest queued jobs per queue looked at in one sweep.")
    heartbeat_s: float = Field(
        default=10.0, gt=0, description="How often each worker process records the shards it runs (worker.watchdog)."
    )
    orphaned_after_s: float = Field(
        default=60.0,
        gt=0,
        description=(
            "A running shard whose heartbeat is older than this, whose job is still active and whose message is "
            "nowhere in the broker is sent again (its worker is gone)."
        ),
    )

    @model_validator(mode="after")
    def _confirm_inside_interval(self) -> SweeperSettings:
        if self.confirm_s >= self.interval_s:
            raise ConfigurationError(
                f"GENQ_SWEEPER__CONFIRM_S ({self.confirm_s}) must be below GENQ_SWEEPER__INTERVAL_S "
                f"({self.interval_s}): a sweep holds its turn for one interval"
            )
        if self.orphaned_after_s < 2 * self.heartbeat_s:
            raise ConfigurationError(
                f"GENQ_SWEEPER__ORPHANED_AFTER_S ({self.orphaned_after_s}) must be at least twice "
                f"GENQ_SWEEPER__HEARTBEAT_S ({self.heartbeat_s}): one late heartbeat must not look like a dead worker"
            )
        return self


class TrainSettings(BaseModel):
    """Fine-tuning workers (``genq worker -Q train``)."""

    lease_ttl_s: float = Field(
        default=30.0, gt=0, description="A training worker's lease on its job; renewed every third of it."
    )
    work_dir: Path | None = Field(
        default=None, description="Scratch space for data sets, checkpoints and exports (default: the temp dir)."
    )
    max_dataset_bytes: int = Field(
        default=2**30, ge=1, description="Largest data set (archive unpacked, or folder) a fine-tune reads."
    )


class C2paSettings(BaseModel):
    """Content Credentials (``provenance: c2pa``): the key and certificate chain that sign each output's C2PA manifest.

    From files (``GENQ_C2PA__KEY_FILE``, ``GENQ_C2PA__CERT_CHAIN_FILE``) or as PEM text in the environment
    (``GENQ_C2PA__KEY``, ``GENQ_C2PA__CERT_CHAIN``); never in the repository. Without them a worker runs every job
    but those asking for c2pa, which fail saying so.
    """

    key_file: Path | None = Field(default=None, description="PEM private key (PKCS#8) of the signing certificate.")
    cert_chain_file: Path | None = Field(
        default=None, description="PEM certificates: the signing (leaf) certificate first, then its issuers."
    )
    key: SecretStr | None = Field(default=None, description="The private key as PEM text, instead of key_file.")
    cert_chain: str | None = Field(default=None, description="The chain as PEM text, instead of cert_chain_file.")
    alg: Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"] = Field(
        default="es256", description="Signature algorithm; it must match the key (es256: an EC P-256 key)."
    )
    tsa_url: str | None = Field(
        default=None,
        description="RFC 3161 time-stamp authority to countersign each signature (off: no network call per image).",
    )

    @model_validator(mode="after")
    def _one_source_each(self) -> C2paSettings:
        if self.key_file is not None and self.key is not None:
            raise ConfigurationError("set GENQ_C2PA__KEY_FILE or GENQ_C2PA__KEY, not both")
        if self.cert_chain_file is not None and self.cert_chain is not None:
            raise ConfigurationError("set GENQ_C2PA__CERT_CHAIN_FILE or GENQ_C2PA__CERT_CHAIN, not both")
        has_key = self.key_file is not None or self.key is not None
        has_chain = self.cert_chain_file is not None or self.cert_chain is not None
        if has_key != has_chain:
            missing = "GENQ_C2PA__CERT_CHAIN_FILE (or _CERT_CHAIN)" if has_key else "GENQ_C2PA__KEY_FILE (or _KEY)"
            raise ConfigurationError(f"C2PA signing needs a key and a certificate chain: set {missing} too")
        if self.tsa_url is not None and not self.tsa_url.startswith(("http://", "https://")):
            raise ConfigurationError(f"GENQ_C2PA__TSA_URL must be an http(s) URL, not {self.tsa_url!r}")
        return self

    @property
    def configured(self) -> bool:
        """Whether a key and chain are given (they may still fail to load)."""
        return self.key_file is not None or self.key is not None


class WorkerSettings(GenqSettings):
    """Everything a worker process needs: the shared groups and the runtime's own."""

    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    storage_retry: StorageRetrySettings = Field(default_factory=StorageRetrySettings)
    celery: CelerySettings = Field(default_factory=CelerySettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    sweeper: SweeperSettings = Field(default_factory=SweeperSettings)
    c2pa: C2paSettings = Field(default_factory=C2paSettings)
    storage: Literal["s3", "local"] = "s3"
    local_dir: Path = Path("./genq-data")
    model_dirs: list[Path] = Field(default_factory=list, description="Extra model folders beside the shipped zoo.")
    model_cache_dir: Path = Field(
        default_factory=lambda: Path.home() / ".cache" / "genq" / "models",
        description="Where published model versions are downloaded to (once per version, shared by processes).",
    )
    model_cache_max_bytes: int = Field(
        default=10 * 2**30,
        ge=0,
        description="Evict the least recently used downloaded versions (unused for an hour) above this size.",
    )
    max_loaded_models: int = Field(
        default=8, ge=1, description="Generators kept in (GPU) memory per process; the least recently used goes."
    )
    device: str = "cpu"
    malloc_arena_max: int = Field(
        default=2,
        ge=0,
        description="glibc malloc arenas per worker process (0: glibc's default; MALLOC_ARENA_MAX, if set, wins).",
    )
    malloc_policy: MallocPolicy = Field(
        default=MallocPolicy.KEEP,
        description=(
            "What glibc malloc does with freed memory: keep (reused, no page faults per forward pass; fastest),"
            " release (big blocks unmapped when freed; flattest memory, slowest) or glibc (its defaults)."
        ),
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="Serve Prometheus metrics on this port (threads/solo pools)."
    )
    sheet_images: int = Field(
        default=64,
        ge=0,
        le=1000,
        description="A generate job's contact sheet (sheet.png beside its manifest) shows its first this many samples, "
        "every rendition of each; 0: no sheet.",
    )
    one_image_manifest: bool = Field(
        default=False,
        description="Store manifest.json for a job of one image without renditions too. By default such a job stores "
        "its image alone, and its manifest (the same document) is served from its record: by the HTTP API's "
        "/manifest, client.manifest() and client.download().",
    )

    @model_validator(mode="after")
    def _no_placeholder_secrets(self) -> WorkerSettings:
        if self.env != "dev" and self.webhook.secret == DEV_WEBHOOK_SECRET:
            raise ConfigurationError("GENQ_WEBHOOK__SECRET is the dev placeholder; set a real whsec_ secret")
        return self
