"""The Kubernetes manifests in ``deploy/k8s`` cannot drift from the CLI: every container's arguments are parsed by
Duet's own parsers (``engine.cli.parse_command``: the same parsers ``duet prefill|decode|router`` use) and turned
into the configs the commands build (addresses validated as at start-up), with the pod's environment (downward
API, Secrets) substituted as the kubelet does; the ports, probes, Secrets, Services and Prometheus jobs they name
must match what those arguments say."""
from __future__ import annotations

import pathlib
import re

import pytest
import yaml

from duet.engine.cli import parse_command
from duet.engine.router.__main__ import advertised
from duet.engine.server.cli import server_config
from duet.transfer.curve import make_keys

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
POD_IP = "10.42.0.7"
SECRET_VALUE = "from-a-secret"


def manifests() -> list[dict]:
    docs = [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"no manifests under {K8S}"
    return docs


def of_kind(kind: str) -> list[dict]:
    return [d for d in manifests() if d["kind"] == kind]


def containers() -> list[tuple[dict, dict]]:
    """(Deployment, container) for every container of every Deployment."""
    out = [(dep, c) for dep in of_kind("Deployment") for c in dep["spec"]["template"]["spec"]["containers"]]
    assert {c["args"][0] for _, c in out} == {"router", "prefill", "decode"}
    return out


def pod_env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet fills it (downward API pod IP, Secret values)."""
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[var["name"]] = POD_IP
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) in secret_keys(), f"{var['name']}: no Secret {ref}"
            env[var["name"]] = SECRET_VALUE
        else:
            pytest.fail(f"{container['name']}: env {var['name']} comes from {var['valueFrom']}, not understood here")
    return env


def secret_keys() -> set[tuple[str, str]]:
    """(Secret, key) of the Secrets in the manifests, plus duet-curve-keys (made from files, see secrets.yaml)."""
    keys = {(s["metadata"]["name"], k) for s in of_kind("Secret") for k in {**s.get("data", {}),
                                                                           **s.get("stringData", {})}}
    return keys | {("duet-curve-keys", k) for k in ("server.key", "server.key_secret", "client.key",
                                                    "client.key_secret", "authorized-client.key")}


def parsed(container: dict, monkeypatch):
    """(command, argparse.Namespace): the container's command line as ``duet`` parses it in that pod."""
    env = pod_env(container)
    for name, value in env.items():  # DUET_* variables are flag defaults: the parsers read them
        monkeypatch.setenv(name, value)
    args = []
    for arg in container["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in env, f"{container['name']}: $({var}) is not in the container's env"
        args.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg))
    assert container["command"] == ["duet"], "the image's entry point is the duet CLI"
    return parse_command(args)


def ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def probe_port(container: dict, probe: str) -> int:
    port = container[probe]["httpGet"]["port"]
    assert container[probe]["httpGet"]["path"] == "/health"
    return ports(container)[port] if isinstance(port, str) else port


def mounted_keys_dir(dep: dict, container: dict, path: str) -> list[str]:
    """The Secret items mounted at ``path`` (the CURVE key directory)."""
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == path]
    [volume] = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == "duet-curve-keys" and secret["defaultMode"] & 0o077 == 0  # curve.py refuses more
    assert "fsGroup" not in dep["spec"]["template"]["spec"].get("securityContext", {})  # it would add group read
    return sorted(item["path"] for item in secret["items"])


def test_every_container_parses_with_duets_own_parsers(monkeypatch, tmp_path):
    keys_layout = sorted(str(p.relative_to(tmp_path)) for p in make_keys(tmp_path))
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    router_labels = None
    registry_port = None
    for dep, container in containers():
        with monkeypatch.context() as env:
            command, args = parsed(container, env)
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == command
        assert args.host == "0.0.0.0" and args.advertise_host == POD_IP  # bind every interface, tell the pod IP
        assert mounted_keys_dir(dep, container, args.zmq_keys) == keys_layout
        assert any(args.model.startswith(m["mountPath"] + "/") for m in container["volumeMounts"])
        if command == "router":
            where = advertised(args)
            assert where.endpoint(args.registry_port) == f"tcp://{POD_IP}:{args.registry_port}"
            assert args.api_key == SECRET_VALUE  # DUET_API_KEY from the Secret, not a flag
            assert probe_port(container, "readinessProbe") == args.port == ports(container)["http"]
            assert ports(container)["registry"] == args.registry_port
            router_labels, registry_port = labels, args.registry_port
        else:
            config = server_config(command, args)  # validates as the server does at start-up
            assert config.advertised.endpoint(args.port) == f"tcp://{POD_IP}:{args.port}"
            assert config.ucx_tls and config.ucx_net_devices  # DUET_UCX_* reached the flags
            assert probe_port(container, "readinessProbe") == args.metrics_port == ports(container)["metrics"]
            assert (ports(container)["command"], ports(container)["events"]) == (args.port, args.event_port)
            m = re.fullmatch(r"tcp://([\w.-]+):(\d+)", args.router)
            assert m, args.router
            service = services[m.group(1)]
            [port] = [p for p in service["spec"]["ports"] if p["port"] == int(m.group(2))]
            assert port["targetPort"] == "registry", f"{command} registers at {args.router}: not the registry"
    assert registry_port is not None
    router_service = services["duet-router"]["spec"]
    assert router_service["selector"].items() <= router_labels.items()


def test_duet_environment_variables_in_the_manifests_exist():
    source = (ROOT / "engine" / "envs.py").read_text()
    for _, container in containers():
        for var in container.get("env", []):
            if var["name"].startswith("DUET_"):
                assert f'"{var["name"]}"' in source, f"{var['name']} is not a setting engine/envs.py reads"


def test_prometheus_jobs_select_the_ports_the_pods_serve_metrics_on():
    [config_map] = [c for c in of_kind("ConfigMap") if c["metadata"]["name"] == "duet-prometheus-scrape"]
    jobs = {job["job_name"]: job for job in yaml.safe_load(config_map["data"]["prometheus.yml"])["scrape_configs"]}
    by_component = {c["args"][0]: c for _, c in containers()}
    for name, components in (("duet-router", ["router"]), ("duet-servers", ["prefill", "decode"])):
        rules = jobs[name]["relabel_configs"]
        keep = {r["source_labels"][0]: r["regex"] for r in rules if r.get("action") == "keep"}
        component_re = keep["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
        assert sorted(c for c in by_component if re.fullmatch(component_re, c)) == sorted(components)
        for component in components:
            assert re.fullmatch(keep["__meta_kubernetes_pod_container_port_name"], "http" if component == "router"
                                else "metrics")
            assert any(re.fullmatch(keep["__meta_kubernetes_pod_container_port_name"], p)
                       for p in ports(by_component[component]))
    assert jobs["duet-router"]["authorization"]["type"] == "Bearer"  # the router's /metrics needs the API key


def test_a_bad_flag_in_a_manifest_would_fail(monkeypatch):
    """The check above is real: the parser rejects what a drifted manifest would say."""
    [(_, container)] = [(d, c) for d, c in containers() if c["args"][0] == "decode"]
    drifted = dict(container, args=[*container["args"], "--advertise-hostname=x"])
    with monkeypatch.context() as env, pytest.raises(SystemExit):
        parsed(drifted, env)
    loopback = dict(container, args=[a.replace("$(POD_IP)", "127.0.0.1") for a in container["args"]])
    with monkeypatch.context() as env:
        command, args = parsed(loopback, env)
    with pytest.raises(ValueError, match="loopback"):
        server_config(command, args)
