"""`NatsServer` as one node of a NATS cluster: three nodes routed to each other form one JetStream
cluster, in which a stream with three replicas can be created and is placed on all three."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import nats.errors
import pytest
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import ensure_buckets_at_start
from corral.runtime.nats import connect
from corral.runtime.natsserver import ClusterNode, NatsServer, local_cluster, start_all
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import StreamConfig
from nats.js.errors import BadRequestError, ServiceUnavailableError

from tests.integration.cli_helpers import without_corral_settings

JETSTREAM_WITHIN_S = 20.0  # the nodes find each other and elect a JetStream meta leader


async def wait_for_jetstream(nc: NATS, replicas: int, timeout: float = JETSTREAM_WITHIN_S) -> None:
    """Wait until JetStream on ``nc`` places a stream on ``replicas`` servers: a new cluster must
    first elect its meta leader and hear from every peer. Each try is answered at once ("no
    suitable peers", "unavailable") or waits out its own short timeout, so this is bounded by
    ``timeout`` without sleeping."""
    js = nc.jetstream(timeout=1.0)
    probe = StreamConfig(name="CLUSTER_PROBE", subjects=["cluster-probe.>"], num_replicas=replicas)
    deadline = time.monotonic() + timeout
    while True:
        try:
            await js.add_stream(probe)
            await js.delete_stream(probe.name)
            return
        except (ServiceUnavailableError, NoRespondersError, NatsTimeoutError, BadRequestError):
            if time.monotonic() > deadline:
                raise


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[NatsServer]]:
    servers = local_cluster(3, tmp_path)
    await start_all(servers)
    try:
        yield servers
    finally:
        for s in servers:
            await s.stop()


def test_a_node_is_given_its_cluster_flags() -> None:
    node = ClusterNode("c", "c-n0", 6222, ("nats://127.0.0.1:6223", "nats://127.0.0.1:6224"))
    assert node.args("127.0.0.1") == [
        "--cluster_name", "c", "--server_name", "c-n0", "--cluster", "nats://127.0.0.1:6222",
        "--routes", "nats://127.0.0.1:6223,nats://127.0.0.1:6224",
    ]  # fmt: skip


async def test_three_nodes_form_a_jetstream_cluster(nodes: list[NatsServer]) -> None:
    nc = await connect(",".join(s.url for s in nodes), name="cluster-test")
    try:
        await wait_for_jetstream(nc, 3)
        js = nc.jetstream(timeout=5.0)
        info = await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
        assert info.config.num_replicas == 3
        # the new stream's interest reaches the client's own node a moment after its creation:
        # until then a publish meets "no responders" at once
        ack = None
        async with asyncio.timeout(10):
            while ack is None:
                with contextlib.suppress(nats.errors.NoRespondersError):
                    ack = await js.publish("r3.one", b"x")
        assert ack.stream == "R3"
        info = await js.stream_info("R3")
        assert info.cluster is not None and info.cluster.name == "corral"
        placed = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
        assert placed == {s.cluster.server_name for s in nodes if s.cluster is not None}
    finally:
        await nc.close()


async def test_services_started_together_on_a_new_cluster_all_open_their_buckets(
    nodes: list[NatsServer], root: str
) -> None:
    """Five services start at once on a cluster that has just formed, each creating the fleet's
    replicated streams: JetStream times out or finds no peers for most of them while the first
    are placed. Each asks again until they are there, rather than exiting."""
    url = ",".join(s.url for s in nodes)
    conns = [await connect(url, name=f"service-{i}") for i in range(5)]
    try:
        await wait_for_jetstream(conns[0], 3)
        subjects = Subjects(root)
        opened = await asyncio.gather(
            *(ensure_buckets_at_start(nc.jetstream(), subjects, replicas=3) for nc in conns)
        )
        assert len(opened) == 5
        info = await conns[0].jetstream().stream_info(f"KV_{subjects.agents_bucket}")
        assert info.config.num_replicas == 3
    finally:
        for nc in conns:
            await nc.close()


async def test_corral_status_as_the_setup_step_waits_for_the_cluster_to_form(
    tmp_path: Path, root: str
) -> None:
    """`corral status` is the deploy files' one-shot setup step, which makes the replicated
    buckets; started beside a cluster still forming (here one node of three), it asks again until
    JetStream can place them, as the services do, instead of failing the whole deployment."""
    servers = local_cluster(3, tmp_path)
    first, rest = servers[0], servers[1:]
    await first.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "corral.cli", "status", "--json", "--nats", ",".join(s.url for s in servers),
        "--root", root, "--js-replicas", "3",
        env=without_corral_settings(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None and proc.stdout is not None
        err = b""
        while b"does not answer yet" not in err:  # a first attempt failed: no quorum to place them
            line = await asyncio.wait_for(proc.stderr.readline(), 60)
            assert line, err.decode()
            err += line
        await start_all(rest)
        out, more = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, (err + more).decode()
        assert json.loads(out)["totals"]["agents"] == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for s in servers:
            await s.stop()
