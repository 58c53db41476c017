"""The transport: a request over NATS and its reply stream, large-body serving, fan-outs; shared by
the gateway, the registry, the CLI and the direct client. No routing decisions live here."""
