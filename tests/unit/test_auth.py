"""`corral auth`: the identities it writes and the permissions each role gets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from corral.auth.config import AuthDirError, add_agent, add_gateway, creds_path, init
from corral.auth.main import main
from corral.auth.permissions import agent_user, role_permissions
from corral.protocol.subjects import Subjects
from corral.runtime.natsauth import CredentialsError, NatsAuth, parse_credentials, read_credentials

S = Subjects("corral")


def test_init_writes_one_private_identity_per_role_and_agent(tmp_path: Path) -> None:
    conf = init(tmp_path / "a", "corral", ["gpu-1"])
    users = {p.stem for p in (tmp_path / "a").glob("*.creds")}
    assert users == {"gateway", "registry", "aggregator", "operator", "agent-gpu-1"}
    for p in [*(tmp_path / "a").glob("*.creds"), conf]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    text = conf.read_text()
    seed = read_credentials(creds_path(tmp_path / "a", "gateway")).nkey
    assert seed.startswith("SU") and seed not in text  # the server's file holds public keys only
    assert text.count("nkey:") == 5 and "# agent-gpu-1" in text


def test_init_refuses_a_directory_with_identities_and_agent_adds_one(tmp_path: Path) -> None:
    init(tmp_path, "corral", passwords=True)
    with pytest.raises(AuthDirError):
        init(tmp_path, "corral")
    path = add_agent(tmp_path, "late")
    assert read_credentials(path).password  # the kind of secret the others have
    assert "# agent-late" in (tmp_path / "auth.conf").read_text()
    with pytest.raises(AuthDirError):
        add_agent(tmp_path, "late")
    with pytest.raises(ValueError):
        add_agent(tmp_path, "bad.id")
    with pytest.raises(ValueError, match="registry"):  # the registry's own control subject
        add_agent(tmp_path, "registry")
    assert not (tmp_path / "agent-registry.creds").exists()


def test_init_refuses_the_registrys_name_as_an_agent(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="registry"):
        init(tmp_path, "corral", ["gpu-1", "registry"])
    assert not any(tmp_path.iterdir())  # nothing written, so the corrected command may run
    init(tmp_path, "corral", ["gpu-1"])


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path), "--root", "r1", "--agents", "a,b"]) == 0
    assert main(["agent", str(tmp_path), "c"]) == 0
    assert {p.stem for p in tmp_path.glob("agent-*.creds")} == {"agent-a", "agent-b", "agent-c"}
    assert main(["init", str(tmp_path)]) == 2
    assert "already holds" in capsys.readouterr().err


def test_an_agent_may_write_only_its_own_state_and_take_only_its_own_work() -> None:
    p = role_permissions(agent_user("a1"), S)
    assert S.kv_key(S.agents_bucket, "a1") in p.publish
    assert not any(s.startswith("$KV.") and s != "$KV.corral_agents.a1" for s in p.publish)
    assert not any(s.startswith(("corral.work", "corral.queue.", "corral.agent.")) for s in p.publish)
    assert not any(s.startswith(("$JS.API.STREAM.CREATE", "$JS.API.STREAM.UPDATE", "$JS.API.STREAM.DELETE"))
                   for s in p.publish)  # fmt: skip
    assert {S.agent_work("a1"), S.agent_ctl("a1"), S.agent_admin("a1")} <= set(p.subscribe)
    assert not any(s.startswith(("corral.reply", "corral.body", "corral.agent.*")) for s in p.subscribe)
    assert "_INBOX_agent-a1.>" in p.subscribe


def test_the_registry_hears_queue_nudges_but_no_event() -> None:
    p = role_permissions("registry", S)
    assert S.queued_all in p.subscribe
    # rebalancing reads each model's slot time from the agents' states, and agents' comings and
    # goings from the agents bucket: no event stream is its to hear
    assert not any(s.startswith("corral.events") for s in p.subscribe)
    assert not any(s.startswith(("corral.work", "corral.queue.")) for s in p.subscribe)


def test_a_gateway_may_cancel_but_not_drain_nor_write_agent_state() -> None:
    p = role_permissions("gateway", S)
    assert S.agent_all("ctl") in p.publish and S.agent_all("admin") not in p.publish
    assert not any(s.startswith("$KV.corral_agents") for s in p.publish)
    # it makes and changes no stream of the fleet, the Batch API's stores included (the operator does)
    assert not [s for s in p.publish if ".STREAM.CREATE" in s or ".STREAM.UPDATE" in s]
    with pytest.raises(ValueError):
        role_permissions("nobody", S)


def test_credentials_files_are_read_strictly() -> None:
    c = parse_credentials("# x\nuser: gw\ninbox: _INBOX_gw\npassword: pw\n")
    assert (c.user, c.inbox, c.password) == ("gw", "_INBOX_gw", "pw") and "pw" not in repr(c)
    for bad in ("user: gw\n", "user: gw\nnkey: SUA\npassword: x\n", "user: gw\nnkey: UAB\n",
                "user: gw\npassword: x\ninbox: a.b\n", "who: gw\n"):  # fmt: skip
        with pytest.raises(CredentialsError):
            parse_credentials(bad)


def test_nats_options_for_an_identity(tmp_path: Path) -> None:
    init(tmp_path, "corral", passwords=True)
    options = NatsAuth(str(creds_path(tmp_path, "registry"))).options()
    assert options["user"] == "registry" and options["inbox_prefix"] == "_INBOX_registry"
    assert NatsAuth().options() == {}
    with pytest.raises(CredentialsError):
        NatsAuth(str(tmp_path / "missing.creds")).options()
    with pytest.raises(CredentialsError):
        NatsAuth(tls_key="k.pem").options()


def test_a_gateway_with_its_own_identity_reads_only_its_own_replies(tmp_path: Path) -> None:
    init(tmp_path / "a", "corral", gateways=["gw1"])
    assert (creds_path(tmp_path / "a", "gateway-gw1")).exists()
    own = role_permissions("gateway-gw1", S)
    assert set(own.subscribe) == {S.reply_all("gw1"), S.body_all("gw1"), "_INBOX_gateway-gw1.>"}
    shared = role_permissions("gateway", S)
    assert S.replies_all in shared.subscribe and S.bodies_all in shared.subscribe
    assert own.publish == shared.publish
    add_gateway(tmp_path / "a", "gw2")
    assert "# gateway-gw2" in (tmp_path / "a" / "auth.conf").read_text()


def test_the_registry_reads_only_its_own_replies_and_no_gateway_takes_its_token(tmp_path: Path) -> None:
    registry = role_permissions("registry", S)
    assert S.registry_replies in registry.subscribe and S.registry_bodies in registry.subscribe
    assert S.replies_all not in registry.subscribe and S.bodies_all not in registry.subscribe
    assert S.replies_all in registry.publish  # it answers pulls on its askers' reply subjects
    with pytest.raises(ValueError, match="registry"):
        init(tmp_path / "a", "corral", gateways=["registry"])
    init(tmp_path / "b", "corral")
    with pytest.raises(ValueError, match="registry"):
        add_gateway(tmp_path / "b", "registry")


def test_gateways_count_key_usage_and_only_the_operator_writes_keys() -> None:
    gateway = role_permissions("gateway", S)
    assert (
        S.kv_key(S.usage_bucket, ">") in gateway.publish and S.kv_key(S.limits_bucket, ">") in gateway.publish
    )
    assert S.kv_key(S.keys_bucket, ">") not in gateway.publish
    assert f"$JS.API.DIRECT.GET.KV_{S.keys_bucket}" in gateway.publish  # it reads them
    assert S.kv_key(S.keys_bucket, ">") in role_permissions("operator", S).publish
    for role in ("registry", "aggregator", "agent-a1"):
        assert not any(S.keys_bucket in p for p in role_permissions(role, S).publish), role


def test_a_gateway_runs_batches_in_its_own_stores_and_nowhere_else() -> None:
    p = role_permissions("gateway", S)
    for right in (
        "corral.batchline.>",  # queue lines
        "$O.corral_files.>",  # write files
        "$KV.corral_batches.>",
        "$KV.corral_batchresults.>",
        "$JS.API.CONSUMER.MSG.NEXT.corral_batchlines.>",  # take lines from the one durable consumer
        "$JS.ACK.corral_batchlines.>",
        "$JS.API.STREAM.PURGE.KV_corral_batchresults",  # forget a finished batch's results
        "$JS.API.DIRECT.GET.KV_corral_batches",
    ):
        assert right in p.publish, right
    assert "$JS.API.STREAM.PURGE.corral_queue" not in p.publish  # nor any other stream's
    assert not any(r.startswith("$JS.API.STREAM.DELETE") for r in p.publish)
    for role in ("registry", "aggregator", "agent-a1"):
        assert not any("batch" in r or "files" in r for r in role_permissions(role, S).publish), role


def test_rebuild_gives_an_older_include_this_versions_permissions(tmp_path: Path) -> None:
    """An include written by an earlier version lacks the permissions added since (here, as one
    that predates the gateway's look at the queue's reader): ``rebuild`` writes it again from the
    identities there, keeping every secret."""
    assert main(["init", str(tmp_path), "--root", "r1", "--agents", "a", "--gateways", "g1"]) == 0
    conf = tmp_path / "auth.conf"
    secrets = {p.name: p.read_text() for p in tmp_path.glob("*.creds")}
    current = conf.read_text()
    assert "$JS.API.CONSUMER.INFO.r1_queue.>" in current
    conf.write_text(current.replace('"$JS.API.CONSUMER.INFO.r1_queue.>"', '"$JS.API.INFO"'))
    assert main(["rebuild", str(tmp_path)]) == 0
    assert conf.read_text() == current
    assert {p.name: p.read_text() for p in tmp_path.glob("*.creds")} == secrets
