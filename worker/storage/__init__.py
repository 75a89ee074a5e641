"""Object storage of outputs: the :class:`~worker.storage.base.Storage` protocol the pipelines see, S3 (``s3``) and a
local folder (``local``, embedded mode)."""
