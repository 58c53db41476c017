"""TLS to NATS: a server with its own CA that demands client certificates; a service reaches it
with --nats-tls-ca, --nats-tls-cert and --nats-tls-key, and nothing reaches it without them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from corral.aggregator.aggregator import Aggregator
from corral.aggregator.settings import AggregatorSettings
from corral.protocol.subjects import Subjects
from corral.runtime.buckets import ensure_buckets
from corral.runtime.nats import connect
from corral.runtime.natsauth import NatsAuth
from corral.runtime.natsserver import NatsServer, ServerTls

from tests.integration.cli_helpers import corral

pytestmark = pytest.mark.integration

ROOT = "tls"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _signed(d: Path, name: str, ext: str) -> None:
    """``name.key`` and ``name.pem``, signed by the CA in ``d``, with the extensions ``ext``."""
    (d / f"{name}.ext").write_text(ext + "\n")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=corral test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    _signed(d, "server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _signed(d, "client", "extendedKeyUsage=clientAuth")
    return d


@pytest.fixture(scope="module")
async def server(pki: Path) -> AsyncIterator[NatsServer]:
    tls = ServerTls(pki / "server.pem", pki / "server.key", ca=pki / "ca.pem", verify=True)
    async with NatsServer(tls=tls) as s:
        yield s


def client_tls(pki: Path) -> NatsAuth:
    return NatsAuth(
        tls_ca=str(pki / "ca.pem"), tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key")
    )


async def test_a_service_with_the_ca_and_a_client_certificate_connects(server: NatsServer, pki: Path) -> None:
    nc = await asyncio.wait_for(connect(server.url, name="admin", auth=client_tls(pki)), 10)
    try:
        await ensure_buckets(nc.jetstream(), Subjects(ROOT))
        assert nc.is_connected and nc.connected_url is not None
    finally:
        await nc.close()
    auth = client_tls(pki)
    settings = AggregatorSettings(
        nats_url=server.url,
        root=ROOT,
        nats_tls_ca=auth.tls_ca,
        nats_tls_cert=auth.tls_cert,
        nats_tls_key=auth.tls_key,
    )
    aggregator = Aggregator(settings)
    await aggregator.start()
    try:
        assert aggregator.nc is not None and aggregator.nc.is_connected
    finally:
        await aggregator.stop()


async def _ping(server: NatsServer, ctx: ssl.SSLContext | None) -> bytes:
    """What the server answers a CONNECT and PING sent over TLS with ``ctx`` (in plain text without
    one): ``PONG`` once in, an error line or nothing when refused. Spoken over a bare socket: nats-py
    cannot close a client whose TLS handshake failed."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        async with asyncio.timeout(10):
            info = await reader.readline()
            assert b'"tls_required":true' in info
            if ctx is not None:
                await writer.start_tls(ctx, server_hostname=server.host)
            writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
            await writer.drain()
            return (await reader.readline()).strip()
    except (ssl.SSLError, ConnectionError) as e:
        return type(e).__name__.encode()
    finally:
        writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await writer.wait_closed()


async def test_the_server_lets_in_only_a_client_with_the_ca_and_a_certificate(
    server: NatsServer, pki: Path
) -> None:
    assert await _ping(server, client_tls(pki).tls_context()) == b"PONG"
    assert await _ping(server, None) != b"PONG"  # plain text: TLS required
    with_ca_only = NatsAuth(tls_ca=str(pki / "ca.pem"))
    assert await _ping(server, with_ca_only.tls_context()) != b"PONG"  # no client certificate
    unknown_ca = NatsAuth(tls_cert=str(pki / "client.pem"), tls_key=str(pki / "client.key"))
    assert await _ping(server, unknown_ca.tls_context()) == b"SSLCertVerificationError"


async def test_a_command_given_a_plain_url_for_a_tls_server_says_so_and_exits_1(server: NatsServer) -> None:
    """nats-py upgrades a nats:// connection to TLS when the server asks, and with no CA given the
    server's certificate does not verify: the command says so in one line, where it used to wait
    for ever on the refused socket's close."""
    plain = server.url.replace("tls://", "nats://")
    rc, _, err = await corral("status", "--nats", plain, "--root", ROOT, timeout=30)
    assert rc == 1 and "refused this process" in err and "certificate verify failed" in err, err
