"""The generation part of the wire contract, and what every job shares: statuses, events, views, the catalogue.

Separate models per direction: ``GenerateRequest`` comes in from a caller, ``GenerateJob`` is the resolved payload a
worker runs, and ``JobView`` goes out. Import these from :mod:`producer.contract`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    UrlConstraints,
    field_validator,
    model_validator,
)

from producer.contract.fields import (
    MAX_JSON_DEPTH,
    MAX_SEED,
    MAX_URL_CHARS,
    MODEL_REF_PATTERN,
    TENANT_PATTERN,
    FreeFormJson,
    NotBool,
    OutputLayout,
    Provenance,
)
from producer.contract.renditions import MAX_RENDITIONS, Rendition, RenditionRef, check_renditions


class JobStatus(StrEnum):
    """Where a job is in its life. Terminal states never change again."""

    QUEUED = "queued"  # accepted and waiting on the queue
    RUNNING = "running"  # a worker is producing outputs
    SUCCEEDED = "succeeded"  # every output is stored and listed
    FAILED = "failed"  # stopped for good; error says why
    CANCELED = "canceled"  # stopped on request; outputs so far are listed

    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


class EventType(StrEnum):
    """What a callback announces; the first four mirror status changes."""

    QUEUED = "queued"
    RUNNING = "running"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class OutputFormat(StrEnum):
    """Encoding of each output image."""

    PNG = "png"  # lossless; provenance in tEXt chunks
    JPEG = "jpeg"  # lossy, smaller; provenance in the JPEG comment
    WEBP = "webp"  # lossless WebP; provenance in XMP

    @property
    def extension(self) -> str:
        return {"png": "png", "jpeg": "jpg", "webp": "webp"}[self.value]

    @property
    def content_type(self) -> str:
        return f"image/{self.value}"


class ModelRef(BaseModel):
    """A parsed model reference: ``name``, ``name@version`` or ``name:alias`` (no alias means ``latest``)."""

    model_config = ConfigDict(frozen=True)

    name: str
    version: str | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        match = MODEL_REF_PATTERN.fullmatch(ref)  # fullmatch: no trailing newline
        if match is None:
            raise ValueError(
                f"invalid model reference {ref!r}: use name, name@version or name:alias "
                "(lower-case letters, digits, '.', '_' and '-')"
            )
        return cls(name=match["name"], version=match["version"], alias=match["alias"])

    def __str__(self) -> str:
        if self.version:
            return f"{self.name}@{self.version}"
        return f"{self.name}:{self.alias}" if self.alias else self.name


class Callback(BaseModel):
    """Where to POST signed events for a job, and which events to send (default: all of them)."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[AnyHttpUrl, UrlConstraints(max_length=MAX_URL_CHARS)] = Field(
        description=f"http(s) URL that receives Standard Webhooks v1 signed POSTs (at most {MAX_URL_CHARS} characters)."
    )
    events: set[EventType] = Field(
        default_factory=lambda: set(EventType), description="Events to deliver; others are skipped."
    )

    @field_validator("url")
    @classmethod
    def _http_only(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        if url.scheme not in ("http", "https"):
            raise ValueError("callback URL must use http or https")
        if not url.host:
            raise ValueError("callback URL needs a host")
        if url.port == 0:  # no server listens there: every delivery would fail
            raise ValueError("callback URL port must be 1-65535, not 0")
        return url


Priority = Literal["high", "normal", "low"]
"""Which queue a job waits in: workers serve ``high`` before ``normal`` before ``low`` (separate queues)."""

LabelKey = Annotated[str | int, NotBool, Field(description="A class name ('sneaker') or its index (7).")]


class GenerateRequest(BaseModel):
    """A caller's request for images: one label with a count, or a map of label -> count."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "fmnist-cgan", "label": "sneaker", "count": 8, "seed": 42, "format": "png"}]
        },
    )

    model: Annotated[str, Field(description="name, name@version or name:alias", max_length=140)]
    label: LabelKey | None = None
    count: Annotated[int, NotBool, Field(ge=1)] | None = Field(
        default=None, description="Images for `label` (default 1)."
    )
    counts: dict[str, Annotated[int, NotBool, Field(ge=1)]] | None = Field(
        default=None, description="Per-label counts, keyed by class name or index; instead of label/count."
    )
    per_class: Annotated[int, NotBool, Field(ge=1)] | None = Field(
        default=None,
        description="This many images of every class of the model (a balanced data set); instead of label/counts.",
    )
    seed: Annotated[int, NotBool, Field(ge=0, le=MAX_SEED)] | None = Field(
        default=None, description="Job seed; chosen and recorded when absent. Image i's seed derives from it."
    )
    format: OutputFormat = OutputFormat.PNG
    callback: Callback | None = None
    metadata: FreeFormJson = Field(
        default_factory=dict,
        description=f"Echoed back in the job view: a JSON object of at most {MAX_JSON_DEPTH} levels, no NaN/Infinity.",
    )
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    output: OutputLayout = Field(
        default="objects",
        description="objects: one object per image; webdataset: one tar per shard of <index>.<ext> + <index>.json.",
    )
    priority: Priority = Field(
        default="normal", description="Queue to wait in: workers take every high job before normal, normal before low."
    )
    renditions: list[Rendition] | None = Field(
        default=None,
        max_length=MAX_RENDITIONS,
        description="Post-processed outputs of every sample, each stored as <index>-<name>.<ext> (absent: one image "
        "per sample at the model's own size, <index>.<ext>).",
    )

    _unique_renditions = field_validator("renditions")(check_renditions)
    provenance: Provenance = Field(
        default="xmp",
        description=(
            "xmp: IPTC DigitalSourceType in XMP and text fields (a rerun stores identical bytes); c2pa: also a signed "
            "C2PA manifest (Content Credentials) in every image; an API key may require c2pa for all its jobs."
        ),
    )

    @field_validator("model")
    @classmethod
    def _valid_model_ref(cls, value: str) -> str:
        ModelRef.parse(value)
        return value

    @field_validator("counts", mode="before")
    @classmethod
    def _stringify_keys(cls, value: Any) -> Any:
        # JSON object keys are strings; accept {7: 3} from Python callers the same as {"7": 3}.
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _one_way_to_ask(self) -> GenerateRequest:
        if self.per_class is not None:
            if self.label is not None or self.count is not None or self.counts is not None:
                raise ValueError("give per_class alone, or label (with count), or counts")
        elif self.counts is not None:
            if self.label is not None or self.count is not None:
                raise ValueError("give either label (with count) or counts, not both")
            if not self.counts:
                raise ValueError("counts must name at least one label")
        elif self.label is None:
            raise ValueError("give a label (with count) or counts")
        return self

    def label_counts(self, num_classes: int | None = None) -> list[tuple[str | int, int]]:
        """The requested (label key, count) pairs, in request order; ``per_class`` needs the model's class count."""
        if self.per_class is not None:
            return [(index, self.per_class) for index in range(num_classes or 0)]
        if self.counts is not None:
            return [(_as_label_key(k), v) for k, v in self.counts.items()]
        assert self.label is not None  # guaranteed by _one_way_to_ask
        label = _as_label_key(self.label) if isinstance(self.label, str) else self.label
        return [(label, self.count or 1)]

    @property
    def total_images(self) -> int:
        """Images asked for; for ``per_class``, per class (the model's class count multiplies it)."""
        return self.per_class if self.per_class is not None else sum(count for _, count in self.label_counts())


def _as_label_key(key: str) -> str | int:
    return int(key) if key.isdecimal() else key


class LabelCount(BaseModel):
    """A resolved class (index and name) and how many images of it."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    name: str
    count: int = Field(ge=1)


class GenerateJob(BaseModel):
    """The resolved payload a worker runs: model version pinned, labels as indices, seed fixed."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["generate"] = "generate"
    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    model: str  # the reference as asked, e.g. "fmnist-cgan"
    # The catalogue key the worker loads (ModelEntry.key): "fmnist-cgan" for a system model, "acme/brand-x" for a
    # model of tenant acme. Only the system's or the job's own tenant's (checked below): never another tenant's files.
    model_name: str
    model_version: str
    items: list[LabelCount] = Field(min_length=1)
    seed: int = Field(ge=0, le=MAX_SEED)
    format: OutputFormat = OutputFormat.PNG
    callback: Callback | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    created_at: datetime
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)  # owner; None for jobs outside the HTTP API
    output: OutputLayout = "objects"
    priority: Priority = "normal"
    renditions: list[Rendition] | None = Field(default=None, max_length=MAX_RENDITIONS)

    _unique_renditions = field_validator("renditions")(check_renditions)
    provenance: Provenance = "xmp"

    @property
    def total_images(self) -> int:
        return sum(item.count for item in self.items)

    def image_labels(self) -> list[LabelCount]:
        """The label of every output image, by output index (items expanded in order)."""
        return [item for item in self.items for _ in range(item.count)]

    @model_validator(mode="after")
    def _model_of_the_system_or_the_tenant(self) -> GenerateJob:
        check_model_owner(self.model_name, self.tenant)
        return self


class Shard(BaseModel):
    """Images ``[start, stop)`` of a job: one task of a bulk job that several workers share."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=0)
    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    count: int = Field(ge=1, description="How many shards the job has.")

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_shards(total: int, shard_size: int) -> list[Shard]:
    """Split ``total`` images into shards of at most ``shard_size``, in index order."""
    if total < 1 or shard_size < 1:
        raise ValueError(f"need total >= 1 and shard_size >= 1, got {total} and {shard_size}")
    starts = range(0, total, shard_size)
    return [Shard(index=k, start=s, stop=min(s + shard_size, total), count=len(starts)) for k, s in enumerate(starts)]


class Progress(BaseModel):
    """Images stored so far out of the total."""

    done: int = 0
    total: int = 0


class JobError(BaseModel):
    """Why a job failed: an error class name and a message that says what to do."""

    type: str
    message: str


class OutputRef(BaseModel):
    """One stored output image: sample ``index`` of the job. With renditions, ``renditions`` lists every one (in the
    request's order) and ``key``, ``sha256`` and ``member`` are those of the first."""

    index: int
    label: str
    label_index: int
    seed: int
    key: str
    sha256: str
    content_type: str
    member: str | None = None  # file inside the tar at ``key`` (webdataset output); None for one object per image
    url: str | None = None  # presigned GET URL, filled in when a client asks for it
    renditions: list[RenditionRef] | None = None  # the job asked for renditions: each stored one, in request order


class Manifest(BaseModel):
    """``manifest.json`` beside a job's outputs: provenance for every image."""

    job_id: str
    model: str
    model_version: str
    seed: int
    format: OutputFormat
    created_at: datetime
    sheet_key: str | None = None  # the contact sheet beside the manifest (absent in manifests made before it)
    outputs: list[OutputRef]

    @classmethod
    def of_view(cls, view: JobView) -> Manifest:
        """The manifest of a succeeded job that stores none (one image, no renditions: its one output is in its
        record), built from its view: the document a stored manifest.json of the job would hold, field for field.

        Raises:
            ValueError: the view cannot make the whole manifest (the job has not succeeded, is a fine-tune, or its
                view lists only its first outputs).
        """
        if view.status is not JobStatus.SUCCEEDED or view.kind != "generate" or view.outputs_truncated:
            raise ValueError(f"job {view.id} ({view.kind}, {view.status.value}): its view cannot make its manifest")
        if view.format is None or view.model_version is None or view.seed is None:
            raise ValueError(f"job {view.id}: its view has no format, model version or seed")
        return cls(
            job_id=view.id,
            model=view.model,
            model_version=view.model_version,
            seed=view.seed,
            format=view.format,
            created_at=view.created_at,
            sheet_key=view.sheet_key,
            outputs=[output.model_copy(update={"url": None}) for output in view.outputs],
        )


class TrainingView(BaseModel):
    """Where a fine-tune stands: its step and losses, latest sample grid, and once done, the published version."""

    step: int = 0
    total_steps: int
    d_loss: float | None = None
    g_loss: float | None = None
    steps_per_s: float | None = None
    eta_s: float | None = Field(default=None, description="Seconds to the last step at the current rate.")
    augment_p: float | None = Field(default=None, description="Probability of each augmentation (ADA adapts it).")
    resumed_from: int | None = Field(default=None, description="Checkpoint step this delivery resumed from.")
    checkpoint_step: int | None = Field(default=None, description="Step of the latest stored checkpoint.")
    samples_key: str | None = Field(default=None, description="Latest sample grid (one row per class).")
    samples_url: str | None = None
    dataset: dict[str, int] = Field(default_factory=dict, description="Usable training images per class.")
    skipped: list[str] = Field(default_factory=list, description="Data set files skipped, with the reason.")
    metrics: dict[str, float] = Field(default_factory=dict, description="Latest evaluation of the EMA generator.")
    model: str | None = Field(default=None, description="The published version, name@version, once succeeded.")
    aliases: list[str] = Field(default_factory=list, description="Aliases moved to the published version.")
    gate_passed: bool | None = Field(default=None, description="Whether the promotion gate passed (None: no gate).")


class JobView(BaseModel):
    """What clients see of a job."""

    id: str
    kind: Literal["generate", "finetune"] = "generate"
    tenant: str | None = None
    status: JobStatus
    priority: Priority = "normal"
    model: str
    model_version: str | None = None
    seed: int | None = None
    format: OutputFormat | None = Field(default=None, description="Generate jobs: the encoding of each output.")
    provenance: Provenance | None = Field(
        default=None, description="Generate jobs: xmp, or c2pa (each output carries signed Content Credentials)."
    )
    progress: Progress = Field(default_factory=Progress)
    shards: int = Field(default=1, description="Tasks the job was split into; several workers share a bulk job.")
    outputs: list[OutputRef] = Field(default_factory=list)
    outputs_truncated: bool = Field(
        default=False, description="True when only the first outputs are listed here; the manifest lists all."
    )
    manifest_key: str | None = Field(
        default=None,
        description="The job's manifest.json, once succeeded; None for a job of one image without renditions, which "
        "stores its image alone: its manifest is served from its record (GET /v1/jobs/{id}/manifest).",
    )
    sheet_key: str | None = Field(
        default=None, description="The job's contact sheet (PNG grid of its first outputs, captioned), once succeeded."
    )
    sheet_url: str | None = Field(default=None, description="A GET URL of the sheet, filled in when a client asks.")
    error: JobError | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    training: TrainingView | None = Field(default=None, description="Fine-tune jobs: step, losses, result.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class WebhookEvent(BaseModel):
    """Body of a callback POST: the event type, when it happened, its place among the job's events, and the job view
    at that moment."""

    type: EventType
    timestamp: datetime
    seq: int | None = Field(
        default=None,
        ge=0,
        description=(
            "The event's number among its job's events (1, 2, ...), taken when it was made: receivers order a job's "
            "events by it, not by arrival. Absent from events made before genq sent it."
        ),
    )
    data: JobView


class ModelVersionInfo(BaseModel):
    """What a client needs to validate a request against one model version, without loading it."""

    arch: str
    class_names: list[str]
    resolution: int
    channels: int
    metrics: dict[str, float] = Field(default_factory=dict, description="Headline scores from its metrics.json.")


class ModelEntry(BaseModel):
    """A model name with its owner, versions and aliases, as published by workers into the catalogue.

    Every model has an owner: the system (``owner`` None: shipped and operator-published models, read-only to
    tenants) or one tenant. The catalogue holds it under :attr:`key`, so tenant A's ``brand-x`` and tenant B's
    ``brand-x`` are two models, and neither is the system's ``brand-x``.
    """

    name: str
    owner: str | None = Field(
        default=None, pattern=TENANT_PATTERN, description="The tenant that owns it; null: a system model."
    )
    versions: dict[str, ModelVersionInfo]
    aliases: dict[str, str] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        """Its key in the catalogue and its identity on workers: ``name``, or ``<owner>/<name>`` for a tenant's."""
        return self.key_of(self.owner, self.name)

    @staticmethod
    def key_of(owner: str | None, name: str) -> str:
        """The catalogue key of ``owner``'s model ``name`` (owner None: the system). Names never hold ``/``."""
        return name if owner is None else f"{owner}/{name}"

    @staticmethod
    def split_key(key: str) -> tuple[str | None, str]:
        """``(owner, name)`` of a catalogue key; owner None for a system model."""
        owner, _, name = key.rpartition("/")
        return owner or None, name

    def resolve(self, ref: ModelRef) -> str:
        """The concrete version a reference names; raises KeyError with a helpful message."""
        if ref.version is not None:
            if ref.version not in self.versions:
                raise KeyError(f"model {ref.name!r} has no version {ref.version!r} (known: {_known(self.versions)})")
            return ref.version
        alias = ref.alias or "latest"
        if alias not in self.aliases:
            raise KeyError(f"model {ref.name!r} has no alias {alias!r} (known: {_known(self.aliases)})")
        return self.aliases[alias]


def check_model_owner(key: str, tenant: str | None) -> None:
    """Refuse a job of ``tenant`` (None: outside the HTTP API) pinning a model that is neither the system's nor its own.

    Raises:
        ValueError: the model key names another owner.
    """
    owner, _ = ModelEntry.split_key(key)
    if owner is not None and owner != tenant:
        raise ValueError(f"model {key!r} is not the system's nor the job's tenant's: a job uses only those")


HEADLINE_METRICS = ("label_consistency", "fid", "precision", "recall", "cas")


def headline_metrics(report: Any) -> dict[str, float]:
    """The scores worth a column in ``genq models``, from a model's ``metrics.json`` (absent ones left out)."""
    if not isinstance(report, dict):
        return {}
    return {k: float(report[k]) for k in HEADLINE_METRICS if isinstance(report.get(k), int | float)}


def _known(names: dict[str, Any]) -> str:
    return ", ".join(sorted(names)) or "none"
