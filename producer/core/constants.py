"""Every Redis key prefix, queue name and task name genq uses, in one place."""

KEY_PREFIX = "genq"

# Redis keys
JOB_KEY = KEY_PREFIX + ":job:{job_id}"  # hash: one per job, see producer.core.store
JOB_EVENTS_KEY = KEY_PREFIX + ":job:{job_id}:events"  # list: callback delivery attempts for the job (DeliveryRecord)
JOB_CALLBACK_GONE_KEY = KEY_PREFIX + ":job:{job_id}:callback_gone"  # string: URL that answered 410; no more events
CALLBACK_DEAD_KEY = KEY_PREFIX + ":callbacks:dead"  # list: CallbackDeadLetter JSON, newest first, capped
IDEMPOTENCY_KEY = KEY_PREFIX + ":idem:{key}"  # string: job id owning an idempotency key
# hash: model key (ModelEntry.key: "<name>" for a system model, "<tenant>/<name>" for a tenant's) -> ModelEntry JSON,
# published by workers
CATALOG_KEY = KEY_PREFIX + ":catalog"
TENANT_JOBS_KEY = KEY_PREFIX + ":tenant:{tenant}:jobs"  # sorted set: a tenant's job ids, score = created (Unix s)
TENANT_IDEMPOTENCY_KEY = KEY_PREFIX + ":tenant:{tenant}:idem:{key}"  # string: IDEMPOTENCY_KEY, scoped to a tenant
API_KEY = KEY_PREFIX + ":apikey:{key_id}"  # string: ApiKey JSON; key_id is the sha256 of the secret key
API_KEYS_INDEX_KEY = KEY_PREFIX + ":apikeys"  # set: every key_id issued, so listing keys never scans the keyspace
API_KEY_ACTIVE_KEY = KEY_PREFIX + ":apikey:{key_id}:active"  # sorted set: the key's non-terminal job ids
API_KEY_IMAGES_KEY = KEY_PREFIX + ":apikey:{key_id}:images:{day}"  # counter: images submitted on a UTC day
API_KEY_BUCKET_KEY = KEY_PREFIX + ":apikey:{key_id}:bucket"  # hash: request rate token bucket
# counter: training images (steps x batch size) of the fine-tunes submitted on a UTC day
API_KEY_TRAIN_IMAGES_KEY = KEY_PREFIX + ":apikey:{key_id}:train_images:{day}"
API_KEY_FINETUNES_KEY = KEY_PREFIX + ":apikey:{key_id}:finetunes"  # sorted set: the key's non-terminal fine-tunes
API_KEY_STREAMS_KEY = KEY_PREFIX + ":apikey:{key_id}:streams"  # sorted set: open event streams, score = last alive
# The key's uploaded data sets (POST /v1/datasets), for their quota and expiry: sorted set of references
# ("<upload id>/<file name>", under TENANT_DATASETS_PREFIX), score = when it expires (Unix s); hash: reference -> bytes;
# and a counter: the bytes of them all (producer.api.quotas)
API_KEY_DATASETS_KEY = KEY_PREFIX + ":apikey:{key_id}:datasets"
API_KEY_DATASET_SIZES_KEY = KEY_PREFIX + ":apikey:{key_id}:datasets:bytes"
API_KEY_DATASET_BYTES_KEY = KEY_PREFIX + ":apikey:{key_id}:dataset_bytes"
# string: the tenant's webhook signing secrets (producer.core.callbacks.secrets.TenantSecret JSON); never expires
TENANT_WEBHOOK_SECRET_KEY = KEY_PREFIX + ":tenant:{tenant}:webhook"
TRAIN_LEASE_KEY = KEY_PREFIX + ":job:{job_id}:lease"  # string: token of the worker training the job (expires)
MODEL_VERSION_COUNTER_KEY = KEY_PREFIX + ":model:{name}:versions"  # counter: last version number given out
TENANT_MODEL_VERSION_COUNTER_KEY = KEY_PREFIX + ":tenant:{tenant}:model:{name}:versions"  # the same, a tenant's model
DEADLETTER_KEY = KEY_PREFIX + ":deadletter"  # list: messages workers could not run, newest first (worker.deadletter)
# hash: status -> jobs in it, kept by JobStore.create and the transition script; never expires (queued and running
# are current counts, the terminal ones cumulative)
JOBS_BY_STATUS_KEY = KEY_PREFIX + ":stats:jobs_by_status"
# sorted set per Celery queue: jobs recorded with messages on that queue, score = created (Unix s). The workers'
# sweeper (worker.sweeper) looks there for jobs whose message the broker lost, and drops a job once every shard of it
# was delivered or it ended; JobStore.create prunes entries older than a job record's TTL.
QUEUED_JOBS_KEY = KEY_PREFIX + ":queued:{queue}"
SWEEPER_LOCK_KEY = KEY_PREFIX + ":sweeper:lock"  # string (expires): one worker sweeps per interval
# sorted set: task ids ("<job id>.<shard>") of shards workers run, score = their last heartbeat (Unix s), written by
# each worker process every GENQ_SWEEPER__HEARTBEAT_S (worker.watchdog); the watchdog sends again a shard whose
# heartbeat stopped while its job is active and whose message is nowhere in the broker
RUNNING_SHARDS_KEY = KEY_PREFIX + ":shards:running"
# Callback events written in the same step as the change they announce (producer/core/lua/announce.lua), turned into
# deliveries by the relay in callbacks workers (producer.core.callbacks.outbox): a stream, read by one consumer group
CALLBACK_OUTBOX_KEY = KEY_PREFIX + ":callbacks:outbox"
CALLBACK_RELAY_GROUP = "relay"
# Callback messages sent and not started yet (producer.core.callbacks.pending.PendingCallbacks), for the sweeper to
# find one the broker lost: sorted set of task ids, score = when due (Unix s), and hash: task id -> the task's
# arguments (JSON)
CALLBACKS_PENDING_KEY = KEY_PREFIX + ":callbacks:pending"
CALLBACKS_PENDING_ARGS_KEY = KEY_PREFIX + ":callbacks:pending:args"
CALLBACKS_RESENT_KEY = KEY_PREFIX + ":callbacks:pending:resent"  # hash: task id -> times the sweeper sent it again
# kombu's Redis transport (its default key): messages workers fetched and have not acked, by delivery tag
KOMBU_UNACKED_KEY = "unacked"

# Celery queues: one per priority (Redis priorities inside one queue are approximate; separate queues served in a
# fixed order are predictable), and callback deliveries on their own.
GENERATE_HIGH_QUEUE = "generate.high"
GENERATE_QUEUE = "generate"  # normal priority
GENERATE_LOW_QUEUE = "generate.low"
GENERATE_QUEUES = {"high": GENERATE_HIGH_QUEUE, "normal": GENERATE_QUEUE, "low": GENERATE_LOW_QUEUE}
# A job of more than SMALL_JOB_MAX_IMAGES images (more than one forward pass at the default max_batch) is bulk work:
# its messages wait in its priority's bulk queue, served right after that priority's small jobs. So another tenant's
# bulk backlog never stands between a small job and the next free thread, and a bulk shard waiting for a bulk slot
# hands its message back when a small job waits (worker.jobs.messages_ahead).
SMALL_JOB_MAX_IMAGES = 64
GENERATE_BULK_QUEUES = {"high": "generate.high.bulk", "normal": "generate.bulk", "low": "generate.low.bulk"}
CALLBACK_QUEUE = "callbacks"
# Requests sent as Celery messages by any Celery client (genq.submit): recorded and enqueued by a worker, not run.
SUBMIT_QUEUE = "submit"
TRAIN_QUEUE = "train"  # fine-tuning: long jobs, one per GPU, on workers of their own (`genq worker -Q train`)
# What `genq worker` consumes by default, in the order it serves them. Callbacks come first: with strict order and a
# backlog of generate jobs, a worker serving callbacks last would announce nothing until the backlog drained, while
# callback deliveries are short and only as many as the jobs' events. Submissions next: each takes milliseconds and
# a job that is not recorded yet cannot even wait its turn.
GENERATE_JOB_QUEUES = tuple(
    queue for priority in GENERATE_QUEUES for queue in (GENERATE_QUEUES[priority], GENERATE_BULK_QUEUES[priority])
)
WORKER_QUEUES = (CALLBACK_QUEUE, SUBMIT_QUEUE, *GENERATE_JOB_QUEUES)
# Every queue job messages wait in: generate jobs' (small and bulk, by priority) and fine-tunes'.
JOB_QUEUES = (*GENERATE_JOB_QUEUES, TRAIN_QUEUE)

# Celery task names: the client enqueues by name, so it never imports the worker.
TASK_PREFIX = "genq."  # every task genq sends; workers refuse others (worker.deadletter)
GENERATE_TASK = TASK_PREFIX + "generate"
CALLBACK_TASK = TASK_PREFIX + "deliver_callback"
FINETUNE_TASK = TASK_PREFIX + "finetune"
SUBMIT_TASK = TASK_PREFIX + "submit"  # a GenerateRequest as keyword arguments, from any Celery client (docs/celery.md)

# Object keys
JOB_PREFIX = "jobs/{job_id}/"
TENANT_JOB_PREFIX = "tenants/{tenant}/jobs/{job_id}/"
MANIFEST_NAME = "manifest.json"
SHEET_NAME = "sheet.png"  # a generate job's contact sheet, beside its manifest
MODELS_PREFIX = "models/"  # published model versions: models/<name>/<version>/ (see worker.catalog.store)
MODEL_VERSION_PREFIX = MODELS_PREFIX + "{name}/{version}/"
MODEL_ALIASES_OBJECT = MODELS_PREFIX + "{name}/aliases.json"
# Tenants' models, one namespace per tenant: tenant-models/<tenant>/<name>/<version>/. Not under tenants/<tenant>/,
# whose job outputs a catalogue scan would have to list too; one listing of this prefix finds every tenant's models.
TENANT_MODELS_PREFIX = "tenant-models/"
TENANT_MODEL_VERSION_PREFIX = TENANT_MODELS_PREFIX + "{tenant}/{name}/{version}/"
TENANT_MODEL_ALIASES_OBJECT = TENANT_MODELS_PREFIX + "{tenant}/{name}/aliases.json"
TRAINING_PREFIX = "training/{job_id}/"  # a fine-tune job's checkpoint and sample grids
DATASETS_PREFIX = "datasets/"  # data sets uploaded by clients for fine-tuning: datasets/<upload id>/...
TENANT_DATASETS_PREFIX = "tenants/{tenant}/datasets/"  # the same under the HTTP API, per tenant
# S3 tag of every tenant's uploaded data set object, for one lifecycle rule that expires them all (S3 filters match
# prefixes and tags, not tenants/*/datasets/; docs/operations.md, Security model)
DATASET_TAG = "genq-kind=dataset"
