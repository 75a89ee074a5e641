"""The fine-tuning part of the wire contract: what a caller asks (:class:`FineTuneRequest`), what a training worker
runs (:class:`FineTuneJob`); :func:`producer.core.resolve.resolve_finetune` turns the one into the other.

A fine-tune adapts a published cGAN to a customer's own images (StyleGAN2-ADA's transfer learning: resume G and
D, augment the few real images, optionally freeze D's first layers) and publishes the result as a new version of a
model that generation workers serve as soon as it lands.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

from producer.contract.fields import MAX_JSON_DEPTH, MAX_SEED, TENANT_PATTERN, FreeFormJson, NotBool
from producer.contract.jobs import Callback, ModelEntry, ModelRef, Priority, check_model_owner

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".npz")
_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
_CLASS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$"
# A dataset reference: an upload's folder ("<id>/", ImageFolder layout) or one archive object in it.
_DATASET_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9][A-Za-z0-9 ._-]{0,127})*/?\Z")

FINETUNE_EXAMPLE: dict[str, JsonValue] = {
    "base": "fmnist-cgan",
    "dataset": "3f2a9c0e1b/",
    "name": "brand-x",
    "steps": 3000,
    "augment": {"policy": ["translation", "cutout", "color"]},
    "gate": {"min_label_consistency": 0.8},
}

AugmentOp = Literal["translation", "cutout", "color"]


class AugmentSpec(BaseModel):
    """Augmentation of real *and* generated images before the discriminator (DiffAugment), fixed or adaptive."""

    model_config = ConfigDict(extra="forbid")

    policy: list[AugmentOp] = Field(
        default_factory=lambda: list[AugmentOp](["translation", "cutout"]),
        description="DiffAugment operations; add 'color' with only a few hundred images. Empty: no augmentation.",
    )
    ada_target: Annotated[float, NotBool, Field(gt=0, lt=1)] | None = Field(
        default=None,
        description="ADA: adapt the probability of each operation so that E[sign(D(real))] approaches this value "
        "(StyleGAN2-ADA uses 0.6). Absent: every operation on every image (classic DiffAugment).",
    )

    @model_validator(mode="after")
    def _ada_needs_operations(self) -> AugmentSpec:
        if self.ada_target is not None and not self.policy:
            raise ValueError("ada_target adapts the probability of the policy's operations: give a policy too")
        if len(set(self.policy)) != len(self.policy):
            raise ValueError("each augmentation operation may appear once")
        return self


class PromotionGate(BaseModel):
    """Metric thresholds a new version must meet before ``alias`` (default ``production``) moves to it.

    ``latest`` always moves. A threshold left out is not checked, but a gate must set at least one: a request with
    an empty gate is refused, and a job holding one never promotes. A gate whose metric cannot be measured for this
    model (label consistency needs class names the in-domain classifier knows) fails closed.
    """

    model_config = ConfigDict(extra="forbid")

    min_label_consistency: Annotated[float, NotBool, Field(ge=0, le=1)] | None = None
    max_fid: Annotated[float, NotBool, Field(gt=0)] | None = None
    alias: Annotated[str, Field(pattern=_NAME_PATTERN)] = "production"


class FineTuneRequest(BaseModel):
    """A caller's request to adapt a cGAN to its own images and publish the result as ``name``'s next version."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [FINETUNE_EXAMPLE]},
    )

    base: Annotated[str, Field(max_length=140, description="The cGAN to start from: name, name@version, name:alias")]
    dataset: Annotated[
        str,
        Field(
            max_length=512,
            description="An uploaded data set (genq upload / POST /v1/datasets): its folder '<id>/' in ImageFolder "
            "layout (one sub-folder per class), or one .zip, .tar, .tar.gz, .tgz or .npz object in it.",
        ),
    ]
    name: Annotated[
        str,
        Field(
            pattern=_NAME_PATTERN,
            description="Model to publish the new version under, in the caller's own namespace: a system model's "
            "name is refused (read-only), another tenant's is another model.",
        ),
    ]
    classes: list[Annotated[str, Field(pattern=_CLASS_PATTERN)]] | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Class names in label order; default: the data set's class folders, sorted. A name the base "
        "knows keeps its learnt embedding; a new one starts from the base's average class.",
    )
    # 300 images transfer far better at 3,000 steps than at 1,500 (classifier FID 30.6 vs 72.5, docs/models.md).
    steps: Annotated[int, NotBool, Field(ge=1, le=200_000)] = 3000
    batch_size: Annotated[int, NotBool, Field(ge=2, le=512)] = 32
    lr_g: Annotated[float, NotBool, Field(gt=0, le=0.01)] = 2e-4
    lr_d: Annotated[float, NotBool, Field(gt=0, le=0.01)] = 2e-4
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    freeze_d: Annotated[int, NotBool, Field(ge=0, le=8)] = Field(
        default=0, description="FreezeD: how many of the discriminator's first blocks keep the base's weights."
    )
    eval_every: Annotated[int, NotBool, Field(ge=1)] | None = Field(
        default=None, description="Steps between evaluations (label consistency, FID); always once at the end."
    )
    sample_every: Annotated[int, NotBool, Field(ge=1)] = Field(default=200, description="Steps between sample grids.")
    checkpoint_every: Annotated[int, NotBool, Field(ge=1)] = Field(
        default=200, description="Steps between checkpoints; a redelivered job resumes from the last one."
    )
    gate: PromotionGate | None = None
    seed: Annotated[int, NotBool, Field(ge=0, le=MAX_SEED)] | None = None
    callback: Callback | None = None
    metadata: FreeFormJson = Field(
        default_factory=dict,
        description=f"Echoed back in the job view: a JSON object of at most {MAX_JSON_DEPTH} levels, no NaN/Infinity.",
    )
    idempotency_key: Annotated[str, Field(min_length=1, max_length=128)] | None = None

    @field_validator("base")
    @classmethod
    def _valid_base(cls, value: str) -> str:
        ModelRef.parse(value)
        return value

    @field_validator("dataset")
    @classmethod
    def _valid_dataset(cls, value: str) -> str:
        if not _DATASET_PATTERN.fullmatch(value) or ".." in value.split("/"):
            raise ValueError(
                "dataset must be an upload's folder like '3f2a9c0e1b/' or an archive in it like '3f2a9c0e1b/data.zip'"
            )
        if not value.endswith("/") and not value.lower().endswith(ARCHIVE_SUFFIXES):
            raise ValueError(
                f"dataset {value!r} is neither a folder (ends with '/') nor an archive ({', '.join(ARCHIVE_SUFFIXES)})"
            )
        return value

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("class names must be unique")
        return value

    @field_validator("gate")
    @classmethod
    def _gate_measures_something(cls, value: PromotionGate | None) -> PromotionGate | None:
        # A gate that checks nothing would promote whatever was trained: refuse it rather than pass it.
        if value is not None and value.min_label_consistency is None and value.max_fid is None:
            raise ValueError(
                f"the gate sets no threshold, so it would promote {value.alias!r} unchecked: give "
                "min_label_consistency and/or max_fid, or leave the gate out (then only 'latest' moves)"
            )
        return value


class FineTuneJob(BaseModel):
    """The resolved payload a training worker runs: base version pinned, data set key absolute, seed fixed."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["finetune"] = "finetune"
    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    base: str  # the reference as asked
    base_name: str  # its catalogue key (ModelEntry.key): a system model or the job's tenant's own
    base_version: str
    dataset_key: str  # storage key of the folder (ends with '/') or archive object
    name: str  # published into the job's tenant's namespace (see target), the system's without a tenant
    classes: list[str] | None = None
    steps: int
    batch_size: int
    lr_g: float
    lr_d: float
    augment: AugmentSpec
    freeze_d: int
    eval_every: int | None = None
    sample_every: int
    checkpoint_every: int
    gate: PromotionGate | None = None
    seed: int = Field(ge=0, le=MAX_SEED)
    callback: Callback | None = None
    metadata: dict[str, JsonValue] = Field(default_factory=dict)
    created_at: datetime
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)
    priority: Priority = "normal"  # fine-tunes share one queue; kept for a uniform job view

    @model_validator(mode="after")
    def _base_of_the_system_or_the_tenant(self) -> FineTuneJob:
        check_model_owner(self.base_name, self.tenant)
        return self

    @property
    def target(self) -> str:
        """The catalogue key the new version is published under: ``name`` in the job's tenant's namespace."""
        return ModelEntry.key_of(self.tenant, self.name)

    @property
    def model_name(self) -> str:
        return self.base_name

    @property
    def total_images(self) -> int:  # progress of a fine-tune counts steps
        return self.steps
