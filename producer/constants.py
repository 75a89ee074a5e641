"""Every Redis key prefix, queue name and task name genq uses, in one place."""

KEY_PREFIX = "genq"

# Redis keys
JOB_KEY = KEY_PREFIX + ":job:{job_id}"  # hash: one per job, see producer.status
JOB_EVENTS_KEY = KEY_PREFIX + ":job:{job_id}:events"  # list: callback deliveries for the job
IDEMPOTENCY_KEY = KEY_PREFIX + ":idem:{key}"  # string: job id owning an idempotency key
CATALOG_KEY = KEY_PREFIX + ":catalog"  # hash: model name -> ModelEntry JSON, published by workers
DELIVERIES_KEY = KEY_PREFIX + ":job:{job_id}:deliveries"  # hash: redelivery counter per job

# Celery queues
GENERATE_QUEUE = "generate"
CALLBACK_QUEUE = "callbacks"

# Celery task names: the client enqueues by name, so it never imports the worker.
GENERATE_TASK = "genq.generate"
CALLBACK_TASK = "genq.deliver_callback"

# Object keys
JOB_PREFIX = "jobs/{job_id}/"
MANIFEST_NAME = "manifest.json"
