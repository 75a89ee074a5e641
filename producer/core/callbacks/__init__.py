"""Callbacks, one concern in one place: the events (``events``), Standard Webhooks signing (``signing``; receivers
verify with :func:`producer.core.callbacks.signing.verify`), the SSRF guard (``ssrf``), one signed POST and the
retry schedule (``send``), one delivery attempt with its record, retry or dead letter (``delivery``), and the
messages kept until a worker starts them (``pending``).
"""
