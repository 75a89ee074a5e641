"""Every Redis key prefix, queue name and task name genq uses, in one place."""

KEY_PREFIX = "genq"

# Redis keys
JOB_KEY = KEY_PREFIX + ":job:{job_id}"  # hash: one per job, see producer.status
JOB_EVENTS_KEY = KEY_PREFIX + ":job:{job_id}:events"  # list: callback deliveries for the job
IDEMPOTENCY_KEY = KEY_PREFIX + ":idem:{key}"  # string: job id owning an idempotency key
CATALOG_KEY = KEY_PREFIX + ":catalog"  # hash: model name -> ModelEntry JSON, published by workers
DELIVERIES_KEY = KEY_PREFIX + ":job:{job_id}:deliveries"  # hash: redelivery counter per job
TENANT_JOBS_KEY = KEY_PREFIX + ":tenant:{tenant}:jobs"  # sorted set: a tenant's job ids, score = created (Unix s)
TENANT_IDEMPOTENCY_KEY = KEY_PREFIX + ":tenant:{tenant}:idem:{key}"  # string: IDEMPOTENCY_KEY, scoped to a tenant
API_KEY = KEY_PREFIX + ":apikey:{key_id}"  # string: ApiKey JSON; key_id is the sha256 of the secret key
API_KEY_ACTIVE_KEY = KEY_PREFIX + ":apikey:{key_id}:active"  # sorted set: the key's non-terminal job ids
API_KEY_IMAGES_KEY = KEY_PREFIX + ":apikey:{key_id}:images:{day}"  # counter: images submitted on a UTC day
API_KEY_BUCKET_KEY = KEY_PREFIX + ":apikey:{key_id}:bucket"  # hash: request rate token bucket

# Celery queues
GENERATE_QUEUE = "generate"
CALLBACK_QUEUE = "callbacks"

# Celery task names: the client enqueues by name, so it never imports the worker.
GENERATE_TASK = "genq.generate"
CALLBACK_TASK = "genq.deliver_callback"

# Object keys
JOB_PREFIX = "jobs/{job_id}/"
TENANT_JOB_PREFIX = "tenants/{tenant}/jobs/{job_id}/"
MANIFEST_NAME = "manifest.json"
