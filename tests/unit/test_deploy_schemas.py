"""The deployment files against the schemas and tools that define them, offline.

Kubernetes objects (the base, each component applied as kustomize would, the HPA) against the API
schemas `kubernetes-validate` ships; the KEDA ScaledObject against KEDA's CRD schema and the queue
it scales on; compose files (alone and with the secure override) against the Compose
Specification's JSON schema; systemd units with ``systemd-analyze verify``; the NATS configurations
with ``nats-server -t``. The schemas are vendored in tests/schemas/ (README there: sources).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from corral.auth.config import init as auth_init
from corral.protocol.names import ANY_VENDOR, parse_name
from corral.protocol.priority import BATCH, INTERACTIVE
from corral.protocol.subjects import Subjects
from corral.runtime.natsserver import find_binary
from corral.runtime.workqueue import consumer_name

from tests.unit.test_deploy import (
    COMPOSE,
    DEPLOY,
    K8S,
    NATS_CONFIGS,
    SERVICES,
    SYSTEMD,
    Invocation,
    check_invocation,
    compose_env,
    corral_image,
    expand,
    k8s_container_env,
    k8s_objects,
    pod_spec,
)

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
COMPOSE_SCHEMA = json.loads((SCHEMAS / "compose-spec.json").read_text())
KEDA_SCHEMA = json.loads((SCHEMAS / "keda-scaledobject-v2.20.2.json").read_text())
K8S_VERSION = kubernetes_validate.latest_version()
COMPONENTS = K8S / "components"
AUTOSCALING = K8S / "autoscaling"
SECURE_COMPOSE = DEPLOY / "compose.secure.yaml"


# -- Kubernetes -------------------------------------------------------------------------------
def k8s_errors(obj: dict[str, Any]) -> str | None:
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{e.message} at {'.'.join(str(p) for p in e.path)}"
    return None


def merge(base: Any, patch: Any) -> Any:
    """A strategic merge patch, as far as these files use it: maps merge (null deletes), lists of
    named items (containers, env, ports, volumes, volumeMounts) merge by name, other lists replace."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    named = isinstance(base, list) and isinstance(patch, list)
    if named and all(isinstance(i, dict) and "name" in i for i in [*base, *patch]):
        out_list = [copy.deepcopy(i) for i in base]
        index = {i["name"]: n for n, i in enumerate(out_list)}
        for item in patch:
            if item["name"] in index:
                out_list[index[item["name"]]] = merge(out_list[index[item["name"]]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def with_components(*names: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The base objects with the named components applied in order (resources added, patches
    merged), as ``kubectl apply -k`` would build them."""
    objects = {key(o): o for _, o in k8s_objects()}
    for name in names:
        folder = COMPONENTS / name
        kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert kustomization["kind"] == "Component"
        listed = {*kustomization.get("resources", []), *(p["path"] for p in kustomization["patches"])}
        assert listed == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}, name
        for resource in kustomization.get("resources", []):
            obj = yaml.safe_load((folder / resource).read_text())
            assert key(obj) not in objects, f"{name}/{resource} redefines {key(obj)}"
            objects[key(obj)] = obj
        for patch_ref in kustomization["patches"]:
            patch = yaml.safe_load((folder / patch_ref["path"]).read_text())
            assert key(patch) in objects, f"{name}/{patch_ref['path']}: no {key(patch)} to patch"
            assert patch["metadata"]["namespace"] == objects[key(patch)]["metadata"]["namespace"]
            objects[key(patch)] = merge(objects[key(patch)], patch)
    return objects


VARIANTS = [(), ("nats-cluster",), ("secure",), ("nats-cluster", "secure"), ("secure", "nats-cluster")]


def corral_containers(objects: dict[tuple[str, str], dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for (kind, name), obj in objects.items():
        spec = pod_spec(obj) if kind != "Job" else obj["spec"]["template"]["spec"]
        out.extend(
            (f"{kind}/{name} container {c['name']}", c)
            for c in (spec or {}).get("containers", [])
            if corral_image(c["image"])
        )
    return out


def container_invocation(where: str, c: dict[str, Any]) -> Invocation:
    env = k8s_container_env(c)
    return Invocation("kubernetes", where, [expand(str(a)) for a in c.get("args", [])], env)


def test_kustomization_lists_the_components() -> None:
    text = (K8S / "kustomization.yaml").read_text()
    for folder in sorted(p for p in COMPONENTS.iterdir() if p.is_dir()):
        assert f"components/{folder.name}" in text, f"kustomization.yaml does not mention {folder.name}"


@pytest.mark.parametrize("components", VARIANTS, ids=["+".join(v) or "base" for v in VARIANTS])
def test_kubernetes_objects_validate(components: tuple[str, ...]) -> None:
    objects = with_components(*components)
    for (kind, name), obj in objects.items():
        assert (error := k8s_errors(obj)) is None, f"{kind}/{name}: {error}"
    deployed = {c["args"][0] for _, c in corral_containers(objects)}
    assert set(SERVICES) <= deployed
    for name in ("registry", "aggregator", "gateway"):
        assert objects["Deployment", name]["spec"]["replicas"] >= 2, name
    for where, c in corral_containers(objects):
        checked = check_invocation(container_invocation(where, c))
        assert c.get("resources", {}).get("limits", {}).get("memory"), f"{where}: no memory limit"
        nats = objects["StatefulSet", "nats"]
        (nats_c,) = nats["spec"]["template"]["spec"]["containers"]
        nats_env = k8s_container_env(nats_c)
        urls = checked.settings.nats_url.split(",")
        if "nats-cluster" in components:
            assert nats["spec"]["replicas"] == 3 and nats_env["NATS_CLUSTER"] == "-cluster"
            assert len(urls) == 3 and checked.settings.js_replicas == 3, where
            routes = sorted(v for k, v in nats_env.items() if k.startswith("NATS_ROUTE_"))
            hosts = sorted(u.split("//")[1].split(":")[0] for u in urls)
            assert [r.split("//")[1].split(":")[0] for r in routes] == hosts, "URLs and routes differ"
        else:
            assert nats["spec"]["replicas"] == 1 and len(urls) == 1 and checked.settings.js_replicas == 1
        if "secure" in components:
            assert nats_env["NATS_SECURE"] == "-secure"
            s = checked.settings
            assert s.nats_creds and s.nats_tls_ca and s.nats_tls_cert and s.nats_tls_key, where
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            for path in (s.nats_creds, s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key):
                assert str(Path(path).parent) in mounts, f"{where}: {path} is not on a mounted Secret"
            role = Path(s.nats_creds).stem
            if c["args"][0] == "agent":
                assert role == f"agent-{s.id}", f"{where}: the agent's identity is not its id"
            else:
                assert role == {"status": "operator"}.get(c["args"][0], c["args"][0]), where
        else:
            assert (
                not checked.settings.nats_creds and "NATS_SECURE" in nats_env and not nats_env["NATS_SECURE"]
            )


def test_kubernetes_validation_can_fail() -> None:
    gateway = copy.deepcopy(with_components()["Deployment", "gateway"])
    gateway["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    assert k8s_errors(gateway) is not None
    gateway = copy.deepcopy(with_components()["Deployment", "gateway"])
    gateway["spec"]["replicas"] = "two"
    assert k8s_errors(gateway) is not None


def test_hpa_alternative_validates() -> None:
    (hpa,) = yaml.safe_load_all((AUTOSCALING / "hpa.yaml").read_text())
    assert (error := k8s_errors(hpa)) is None, error
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) in with_components()


# -- KEDA -------------------------------------------------------------------------------------
def closed(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server prunes (drops) them: a typo
    in a field name would otherwise pass and then silently do nothing."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


KEDA_VALIDATOR = jsonschema.Draft7Validator(closed(KEDA_SCHEMA))


def scaled_objects() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((AUTOSCALING / "keda.yaml").read_text()) if d]


def test_keda_scaled_objects_validate_and_scale_the_gpu_sets() -> None:
    objects = with_components()
    gpu_sets = {n for (k, n), o in objects.items() if k == "StatefulSet" and n.startswith("ollama-")}
    found = set()
    for so in scaled_objects():
        assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
        errors = [f"{e.message} at {list(e.path)}" for e in KEDA_VALIDATOR.iter_errors(so)]
        assert not errors, errors
        target = so["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in objects and target["apiVersion"] == "apps/v1"
        assert so["metadata"]["namespace"] == objects[target["kind"], target["name"]]["metadata"]["namespace"]
        found.add(target["name"])
        assert so["spec"]["minReplicaCount"] >= 1, "with no agent the gateway answers 404: nothing wakes it"
    assert found == gpu_sets


def test_keda_triggers_name_the_real_queue_stream_and_consumer() -> None:
    subjects = Subjects("corral")
    text = (AUTOSCALING / "keda.yaml").read_text()
    for so in scaled_objects():
        for trigger in so["spec"]["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            meta = trigger["metadata"]
            assert meta["stream"] == subjects.queue_stream
            assert meta["natsServerMonitoringEndpoint"] == "nats.corral.svc:8222"
            # the comment beside the consumer names its model; the name must be that model's
            line = next(line for line in text.splitlines() if meta["consumer"] in line)
            model = line.split("#", 1)[1].strip()
            lane, _, model = model.rpartition(" ")
            priority = BATCH if lane == "batch" else INTERACTIVE
            assert meta["consumer"] == consumer_name(
                subjects.queue(ANY_VENDOR, parse_name(model).token, priority)
            )


def test_keda_validation_can_fail() -> None:
    so = copy.deepcopy(scaled_objects()[0])
    so["spec"]["minReplicaCount"] = "one"
    assert list(KEDA_VALIDATOR.iter_errors(so))
    so = copy.deepcopy(scaled_objects()[0])
    so["spec"]["scaleTargetRefs"] = so["spec"].pop("scaleTargetRef")
    assert list(KEDA_VALIDATOR.iter_errors(so))


# -- compose ----------------------------------------------------------------------------------
COMPOSE_VALIDATOR = jsonschema.Draft7Validator(COMPOSE_SCHEMA)


def compose_with_secure() -> dict[str, Any]:
    """compose.yaml with compose.secure.yaml on top, merged as Compose merges: maps merge, the
    command replaces, secrets lists add up."""
    base = yaml.safe_load(COMPOSE.read_text())
    over = yaml.safe_load(SECURE_COMPOSE.read_text())
    out = merge(base, {k: v for k, v in over.items() if k != "services"})
    for name, svc in over["services"].items():
        out["services"][name] = merge(out["services"].get(name, {}), svc)
    return out


@pytest.mark.parametrize("path", [COMPOSE, SECURE_COMPOSE], ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification(path: Path) -> None:
    errors = [
        f"{e.message} at {list(e.path)}"
        for e in COMPOSE_VALIDATOR.iter_errors(yaml.safe_load(path.read_text()))
    ]
    assert not errors, errors


def test_compose_validation_can_fail() -> None:
    data = yaml.safe_load(COMPOSE.read_text())
    data["services"]["gateway"]["stop_grace_periodd"] = "40s"
    assert list(COMPOSE_VALIDATOR.iter_errors(data))


def test_compose_secure_gives_every_corral_process_its_identity_and_tls() -> None:
    merged = compose_with_secure()
    assert not list(COMPOSE_VALIDATOR.iter_errors(merged))
    secrets = merged["secrets"]
    for name, svc in merged["services"].items():
        if name.startswith("nats"):
            if name != "nats-setup":
                targets = {s["target"] for s in svc["secrets"]}
                assert "/etc/nats/auth/auth.conf" in targets, name
                assert "-secure" in expand(svc["command"][-1])
            continue
        if not corral_image(svc.get("image", "")) and name != "nats-setup":
            continue
        env = compose_env(svc)
        argv = svc["command"] if isinstance(svc["command"], list) else svc["command"].split()
        checked = check_invocation(Invocation("compose", f"secure {name}", [expand(a) for a in argv], env))
        s = checked.settings
        used = {x if isinstance(x, str) else x["source"] for x in svc["secrets"]}
        for path in (s.nats_creds, s.nats_tls_ca, s.nats_tls_cert, s.nats_tls_key):
            assert path.startswith("/run/secrets/") and path.removeprefix("/run/secrets/") in used, (
                name,
                path,
            )
        creds_file = Path(expand(secrets[s.nats_creds.removeprefix("/run/secrets/")]["file"])).stem
        if argv[0] == "agent":
            assert creds_file == f"agent-{s.id}", name
        else:
            assert creds_file == {"status": "operator"}.get(argv[0], argv[0]), name
        if name != "nats-setup":
            assert svc["depends_on"]["nats-setup"]["condition"] == "service_completed_successfully"


def test_compose_cluster_env_file() -> None:
    env = dict(
        line.split("=", 1)
        for line in (DEPLOY / "cluster.env").read_text().splitlines()
        if line and line[0] != "#"
    )
    assert env["COMPOSE_PROFILES"] == "cluster" and env["JS_REPLICAS"] == "3"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    hosts = [u.split("//")[1].split(":")[0] for u in env["NATS_URL"].split(",")]
    assert sorted(hosts) == sorted(n for n in services if n.startswith("nats")), hosts
    routes = services["nats"]["environment"]
    assert sorted(
        v.split("//")[1].split(":")[0] for k, v in routes.items() if k.startswith("NATS_ROUTE")
    ) == sorted(hosts)
    assert {env["NATS_CONFIG"], env["NATS_SECURE_CONFIG"]} <= set(NATS_CONFIGS)


# -- systemd ----------------------------------------------------------------------------------
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed here")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on each unit, its binaries pointed at this venv's (verify checks
    that they exist and are executable)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "corral").symlink_to(Path(shutil.which("corral") or find_binary()).resolve())
    (bin_dir / "nats-server").symlink_to(Path(find_binary()).resolve())
    units = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        name = unit.name.replace("@.", "@1.")
        text = unit.read_text().replace("/opt/corral/bin/", f"{bin_dir}/")
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 0 and not complaints, "\n".join(complaints)


# -- NATS configurations ----------------------------------------------------------------------
OPENSSL = shutil.which("openssl")


def make_tls(folder: Path) -> None:
    """A CA and a server certificate signed by it, with openssl."""
    folder.mkdir()

    def run(*args: str) -> None:
        subprocess.run([str(OPENSSL), *args], cwd=folder, check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
        "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=nats",
        "-keyout", "server.key", "-out", "server.csr")  # fmt: skip
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "1", "-out", "server.pem")  # fmt: skip


@pytest.mark.skipif(
    OPENSSL is None, reason="openssl is not installed here (the secure configs need certificates)"
)
@pytest.mark.parametrize("config", NATS_CONFIGS)
def test_nats_server_accepts_every_config(tmp_path: Path, config: str) -> None:
    """Each of the four configurations, as the deploy files lay them out (auth/auth.conf from
    `corral auth init`, the TLS files), passes ``nats-server -t``."""
    for name in (*NATS_CONFIGS, "secure.conf"):
        text = (DEPLOY / name).read_text()
        text = text.replace("/data/jetstream", str(tmp_path / "js")).replace(
            "/etc/nats/tls", str(tmp_path / "tls")
        )
        (tmp_path / name).write_text(text)
    auth_init(tmp_path / "auth", "corral", ["gpu-0"])
    make_tls(tmp_path / "tls")
    env = {
        **os.environ,
        "NATS_SERVER_NAME": "nats-1",
        "NATS_ROUTE_1": "nats-route://nats-1:6222",
        "NATS_ROUTE_2": "nats-route://nats-2:6222",
        "NATS_ROUTE_3": "nats-route://nats-3:6222",
    }
    result = subprocess.run(
        [find_binary(), "-t", "-c", str(tmp_path / config)],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0 and "is valid" in result.stdout + result.stderr, (
        result.stdout + result.stderr
    )
    if "cluster" in config:  # without its variables a cluster node does not start
        bare = {k: v for k, v in env.items() if not k.startswith("NATS_")}
        result = subprocess.run(
            [find_binary(), "-t", "-c", str(tmp_path / config)],
            capture_output=True,
            text=True,
            timeout=30,
            env=bare,
            check=False,
        )
        assert result.returncode != 0
