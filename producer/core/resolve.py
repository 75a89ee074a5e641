"""Turning a caller's :class:`GenerateRequest` into the :class:`GenerateJob` a worker runs.

Pure but for one DNS lookup: the model catalogue and the limits come in as arguments, so the Python client
(catalogue in Redis) and the embedded mode (catalogue from local model folders) share every check; a callback URL's
host is resolved to refuse internal addresses (``producer.core.callbacks.ssrf``). Every refusal names the field.

Model ownership: a caller sees the catalogue through :func:`visible_models`, the system's models and its tenant's
own, so another tenant's model answers exactly like one that does not exist, and the job pins the owner-qualified
key (:attr:`ModelEntry.key`) the worker loads. A tenant's fine-tune publishes into its own namespace only.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from producer.contract import (
    FineTuneJob,
    FineTuneRequest,
    GenerateJob,
    GenerateRequest,
    LabelCount,
    ModelEntry,
    ModelRef,
    ModelVersionInfo,
    output_size,
)
from producer.core import constants
from producer.core.callbacks.ssrf import check_callback_url
from producer.core.seeds import new_job_seed
from producer.core.settings import Limits
from producer.errors import InvalidJob


def resolve_request(
    request: GenerateRequest,
    catalog: Mapping[str, ModelEntry],
    limits: Limits,
    *,
    job_id: str,
    now: datetime,
    tenant: str | None = None,
    allow_hosts: Sequence[str] = (),
) -> GenerateJob:
    """Validate ``request`` against the catalogue and limits and pin model version, labels and seed.

    ``tenant`` (the HTTP API's caller) is recorded on the job: it owns the job and its outputs' prefix, and the
    request may name the system's models and the tenant's own only (None: the system's; see :func:`visible_models`).
    ``allow_hosts`` (``GENQ_WEBHOOK__ALLOW_HOSTS``) lists the non-public hosts a callback may reach.

    Raises:
        InvalidJob: with ``field`` set to the offending field (``model``, ``label``, ``counts.<key>``, ``count``,
            ``metadata``, ``callback.url``: an address genq will not call, or a host that does not resolve).
    """
    check_limits(request, limits)
    ref, entry, version, info = resolve_model(request.model, visible_models(catalog, tenant), field="model")
    field = "label" if request.counts is None else "counts"
    items: list[LabelCount] = []
    for key, count in request.label_counts(len(info.class_names)):
        index = _label_index(key, info, ref.name, field if field == "label" else f"counts.{key}")
        items.append(LabelCount(index=index, name=info.class_names[index], count=count))
    total = sum(item.count for item in items)
    if (
        request.per_class is not None and total > limits.max_images_per_job
    ):  # per_class: known only now, with the model's class count
        raise InvalidJob(
            f"{total} images requested ({request.per_class} for each of {len(items)} classes), the limit is "
            f"{limits.max_images_per_job} per job (GENQ_LIMITS__MAX_IMAGES_PER_JOB); split the request",
            field="per_class",
        )
    check_output_pixels(request, total, info, limits)
    if request.callback is not None:  # last: the only check that may wait on DNS
        check_callback_url(str(request.callback.url), allow_hosts)
    return GenerateJob(
        job_id=job_id,
        model=request.model,
        model_name=entry.key,
        model_version=version,
        items=items,
        seed=request.seed if request.seed is not None else new_job_seed(),
        format=request.format,
        callback=request.callback,
        metadata=request.metadata,
        created_at=now,
        tenant=tenant,
        priority=request.priority,
        output=request.output,
        renditions=request.renditions,
        provenance=request.provenance,
    )


def check_output_pixels(request: GenerateRequest, images: int, info: ModelVersionInfo, limits: Limits) -> None:
    """Refuse a job that would write more than ``GENQ_LIMITS__MAX_OUTPUT_PIXELS_PER_JOB`` pixels: ``images``
    samples of the model's size, or of each rendition's exact size (every rendition counted)."""
    side = info.resolution
    if request.renditions:
        sizes = [output_size(side, side, r) for r in request.renditions]
        per_image = sum(w * h for w, h in sizes)
        what = " + ".join(f"{w}x{h}" for w, h in sizes)
        field = "renditions"
    else:
        per_image, what = side * side, f"{side}x{side}"
        field = "per_class" if request.per_class else "count" if request.counts is None else "counts"
    pixels = images * per_image
    if pixels > limits.max_output_pixels_per_job:
        raise InvalidJob(
            f"this job would write {pixels:,} output pixels ({images:,} images of {what}), the limit is "
            f"{limits.max_output_pixels_per_job:,} per job (GENQ_LIMITS__MAX_OUTPUT_PIXELS_PER_JOB); ask for fewer "
            "images or smaller renditions",
            field=field,
        )


def visible_models(catalog: Mapping[str, ModelEntry], tenant: str | None) -> dict[str, ModelEntry]:
    """The models ``tenant`` may name, by the name it names them: the system's and its own, sorted by name.

    ``catalog`` is the whole catalogue (any keys; each entry's ``owner`` decides). Another tenant's models are left
    out, so naming one answers exactly like naming a model that does not exist (no existence oracle). Without a
    tenant (the operator's client, the CLI, embedded mode), the system's models only. A tenant's own model shadows a
    system model of the same name (one an operator published later): the name it used keeps naming its model.
    """
    system: dict[str, ModelEntry] = {}
    own: dict[str, ModelEntry] = {}
    for entry in catalog.values():
        if entry.owner is None:
            system[entry.name] = entry
        elif tenant is not None and entry.owner == tenant:
            own[entry.name] = entry
    merged = {**system, **own}
    return {name: merged[name] for name in sorted(merged)}


def resolve_model(
    reference: str, models: Mapping[str, ModelEntry], *, field: str, what: str = "model"
) -> tuple[ModelRef, ModelEntry, str, ModelVersionInfo]:
    """The parsed reference, its model, the version it names and that version's info.

    ``models`` are the caller's, by name (:func:`visible_models`). Raises InvalidJob on ``field``.
    """
    ref = ModelRef.parse(reference)
    entry = models.get(ref.name)
    if entry is None:
        known = ", ".join(sorted(models)) or "none published; is a worker running?"
        raise InvalidJob(f"unknown {what} {ref.name!r} (known: {known})", field=field)
    try:
        version = entry.resolve(ref)
    except KeyError as exc:
        raise InvalidJob(str(exc.args[0]), field=field) from exc
    return ref, entry, version, entry.versions[version]


def check_limits(request: GenerateRequest, limits: Limits) -> None:
    """Refuse a request over the deployment's limits, naming the field and the setting that sets the limit."""
    total = request.total_images
    if total > limits.max_images_per_job:
        field = "per_class" if request.per_class else "count" if request.counts is None else "counts"
        raise InvalidJob(
            f"{total} images requested, the limit is {limits.max_images_per_job} per job "
            "(GENQ_LIMITS__MAX_IMAGES_PER_JOB); split the request",
            field=field,
        )
    check_metadata(request.metadata, limits)


def check_metadata(metadata: Mapping[str, object], limits: Limits) -> None:
    """Refuse ``metadata`` larger than ``GENQ_LIMITS__MAX_METADATA_BYTES`` as compact JSON (field ``metadata``): the
    deployment's bound on every job's metadata, generate or fine-tune, below the contract's own (64 KiB, 32 deep)."""
    size = len(json.dumps(metadata, separators=(",", ":")).encode())
    if size > limits.max_metadata_bytes:
        raise InvalidJob(
            f"metadata is {size} bytes as JSON, the limit is {limits.max_metadata_bytes} "
            "(GENQ_LIMITS__MAX_METADATA_BYTES)",
            field="metadata",
        )


def _label_index(key: str | int, info: ModelVersionInfo, model: str, field: str) -> int:
    names = info.class_names
    if isinstance(key, int):
        if not 0 <= key < len(names):
            raise InvalidJob(f"label index {key} out of range 0..{len(names) - 1} for model {model!r}", field=field)
        return key
    if key not in names:
        raise InvalidJob(f"unknown label {key!r} for model {model!r} (known: {', '.join(names)})", field=field)
    return names.index(key)


def dataset_prefix(tenant: str | None) -> str:
    """Where a caller's uploaded data sets live: per tenant under the HTTP API, so none reads another's."""
    if tenant is None:
        return constants.DATASETS_PREFIX
    return constants.TENANT_DATASETS_PREFIX.format(tenant=tenant)


def resolve_finetune(
    request: FineTuneRequest,
    catalog: Mapping[str, ModelEntry],
    limits: Limits,
    *,
    job_id: str,
    now: datetime,
    tenant: str | None = None,
    allow_hosts: Sequence[str] = (),
) -> FineTuneJob:
    """Check ``request`` against the catalogue and pin the base version, the data set's key and the seed.

    The base is one of the caller's models (:func:`visible_models`); the new version is published as ``name`` in
    the caller's namespace: the tenant's own models under the HTTP API, the system's without a tenant (operators).

    Raises:
        InvalidJob: with ``field`` naming the offending field (``metadata``: over ``limits.max_metadata_bytes``;
            ``base``: unknown, or not a cGAN; ``name``: a system model's name asked by a tenant (read-only), or the
            name of a model of another architecture; ``freeze_d``; ``callback.url``).
    """
    check_metadata(request.metadata, limits)
    models = visible_models(catalog, tenant)
    ref, base, version, info = resolve_model(request.base, models, field="base", what="base model")
    if info.arch != "cgan":
        raise InvalidJob(
            f"fine-tuning needs a cgan base; {ref.name}@{version} is a {info.arch} (try fmnist-cgan)", field="base"
        )
    target = models.get(request.name)
    if target is not None and target.owner != tenant:  # a system model, seen by a tenant
        raise InvalidJob(
            f"model {request.name!r} is a system model, read-only to tenants: publish your fine-tune under a name "
            "of your own (it stays yours: other tenants neither see nor use it)",
            field="name",
        )
    if target is not None and any(v.arch != "cgan" for v in target.versions.values()):
        raise InvalidJob(f"model {request.name!r} exists and is not a cgan: choose another name", field="name")
    if request.callback is not None:
        check_callback_url(str(request.callback.url), allow_hosts)
    return FineTuneJob(
        job_id=job_id,
        base=request.base,
        base_name=base.key,
        base_version=version,
        dataset_key=dataset_prefix(tenant) + request.dataset,
        name=request.name,
        classes=request.classes,
        steps=request.steps,
        batch_size=request.batch_size,
        lr_g=request.lr_g,
        lr_d=request.lr_d,
        augment=request.augment,
        freeze_d=request.freeze_d,
        eval_every=request.eval_every,
        sample_every=request.sample_every,
        checkpoint_every=request.checkpoint_every,
        gate=request.gate,
        seed=request.seed if request.seed is not None else new_job_seed(),
        callback=request.callback,
        metadata=request.metadata,
        created_at=now,
        tenant=tenant,
    )
