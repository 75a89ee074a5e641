"""The core both sides run on: the job store, job messages, request resolution, callbacks (sign, vet, send, record,
retry), the S3 client factory, key names and the settings base.

Imported by the client, the HTTP API and the workers; imports none of them (only the contract and the errors).
"""
