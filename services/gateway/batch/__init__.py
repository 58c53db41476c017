"""The OpenAI Batch and Files APIs on the gateway (``/v1/files``, ``/v1/batches``), kept in JetStream.

Modules, bottom to top: `model` (the wire shapes and the batch state machine, pure), `lines`
(input validation and output assembly, pure), `store` (the object store, KV buckets and line stream),
`runner` (every gateway's share of the fleet-wide work on batch lines), `routes` (the HTTP API).
"""
