"""NATS identities for a fleet: one user per role, each allowed only the subjects its code uses
(`corral auth init`)."""
