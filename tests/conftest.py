"""Shared fixtures: a real nats-server (JetStream) per test module, a fresh subject root per test."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from corral.runtime.natsserver import NatsServer


@pytest.fixture(scope="module")
async def nats_server() -> AsyncIterator[NatsServer]:
    async with NatsServer() as server:
        yield server


@pytest.fixture
def root() -> str:
    """An isolated subject root (and KV prefix), so tests can share one server safely."""
    return "t" + secrets.token_hex(4)
