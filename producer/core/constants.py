"""Every Redis key prefix, queue name and task name genq uses, in one place."""

KEY_PREFIX = "genq"

# Redis keys
JOB_KEY = KEY_PREFIX + ":job:{job_id}"  # hash: one per job, see producer.core.store
JOB_EVENTS_KEY = KEY_PREFIX + ":job:{job_id}:events"  # list: callback delivery attempts for the job (DeliveryRecord)
JOB_CALLBACK_GONE_KEY = KEY_PREFIX + ":job:{job_id}:callback_gone"  # string: URL that answered 410; no more events
CALLBACK_DEAD_KEY = KEY_PREFIX + ":callbacks:dead"  # list: CallbackDeadLetter JSON, newest first, capped
IDEMPOTENCY_KEY = KEY_PREFIX + ":idem:{key}"  # string: job id owning an idempotency key
CATALOG_KEY = KEY_PREFIX + ":catalog"  # hash: model name -> ModelEntry JSON, published by workers
TENANT_JOBS_KEY = KEY_PREFIX + ":tenant:{tenant}:jobs"  # sorted set: a tenant's job ids, score = created (Unix s)
TENANT_IDEMPOTENCY_KEY = KEY_PREFIX + ":tenant:{tenant}:idem:{key}"  # string: IDEMPOTENCY_KEY, scoped to a tenant
API_KEY = KEY_PREFIX + ":apikey:{key_id}"  # string: ApiKey JSON; key_id is the sha256 of the secret key
API_KEYS_INDEX_KEY = KEY_PREFIX + ":apikeys"  # set: every key_id issued, so listing keys never scans the keyspace
API_KEY_ACTIVE_KEY = KEY_PREFIX + ":apikey:{key_id}:active"  # sorted set: the key's non-terminal job ids
API_KEY_IMAGES_KEY = KEY_PREFIX + ":apikey:{key_id}:images:{day}"  # counter: images submitted on a UTC day
API_KEY_BUCKET_KEY = KEY_PREFIX + ":apikey:{key_id}:bucket"  # hash: request rate token bucket
TRAIN_LEASE_KEY = KEY_PREFIX + ":job:{job_id}:lease"  # string: token of the worker training the job (expires)
MODEL_VERSION_COUNTER_KEY = KEY_PREFIX + ":model:{name}:versions"  # counter: last version number given out
DEADLETTER_KEY = KEY_PREFIX + ":deadletter"  # list: messages workers could not run, newest first (worker.deadletter)
# hash: status -> jobs in it, kept by JobStore.create and the transition script; never expires (queued and running
# are current counts, the terminal ones cumulative)
JOBS_BY_STATUS_KEY = KEY_PREFIX + ":stats:jobs_by_status"
# sorted set per Celery queue: jobs recorded with messages on that queue, score = created (Unix s). The workers'
# sweeper (worker.sweeper) looks there for jobs whose message the broker lost, and drops a job once every shard of it
# was delivered or it ended; JobStore.create prunes entries older than a job record's TTL.
QUEUED_JOBS_KEY = KEY_PREFIX + ":queued:{queue}"
SWEEPER_LOCK_KEY = KEY_PREFIX + ":sweeper:lock"  # string (expires): one worker sweeps per interval
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
CALLBACK_QUEUE = "callbacks"
TRAIN_QUEUE = "train"  # fine-tuning: long jobs, one per GPU, on workers of their own (`genq worker -Q train`)
# What `genq worker` consumes by default, in the order it serves them. Callbacks come first: with strict order and a
# backlog of generate jobs, a worker serving callbacks last would announce nothing until the backlog drained, while
# callback deliveries are short and only as many as the jobs' events.
WORKER_QUEUES = (CALLBACK_QUEUE, GENERATE_HIGH_QUEUE, GENERATE_QUEUE, GENERATE_LOW_QUEUE)

# Celery task names: the client enqueues by name, so it never imports the worker.
GENERATE_TASK = "genq.generate"
CALLBACK_TASK = "genq.deliver_callback"
FINETUNE_TASK = "genq.finetune"

# Object keys
JOB_PREFIX = "jobs/{job_id}/"
TENANT_JOB_PREFIX = "tenants/{tenant}/jobs/{job_id}/"
MANIFEST_NAME = "manifest.json"
MODELS_PREFIX = "models/"  # published model versions: models/<name>/<version>/ (see worker.catalog.store)
MODEL_VERSION_PREFIX = MODELS_PREFIX + "{name}/{version}/"
MODEL_ALIASES_OBJECT = MODELS_PREFIX + "{name}/aliases.json"
TRAINING_PREFIX = "training/{job_id}/"  # a fine-tune job's checkpoint and sample grids
DATASETS_PREFIX = "datasets/"  # data sets uploaded by clients for fine-tuning: datasets/<upload id>/...
TENANT_DATASETS_PREFIX = "tenants/{tenant}/datasets/"  # the same under the HTTP API, per tenant
