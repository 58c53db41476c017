"""Shared plumbing: settings, NATS connection and JetStream setup, the embedded nats-server."""
