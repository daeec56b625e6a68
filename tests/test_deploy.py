"""The deployment files under deploy/: each parses, names endpoints the server has, ports and
services that match one another, metrics the server exports; and a fleet of two server
processes with a client spreading its requests across them."""

import json
import re
import sys
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("starlette")
pytest.importorskip("prometheus_client")

from sparsa.serve import http, metrics  # noqa: E402

DEPLOY = Path(__file__).parent.parent / "deploy"


def route_paths():
    """The paths the server answers, with the model name and version filled in."""
    server = types.SimpleNamespace(models={}, ready=True, instances=[])
    app = http.app(server, metrics.Metrics())
    return {route.path.replace("{name}", "m").replace("{version}", "1")
            for route in app.routes}


def probes(manifest):
    for container in manifest["spec"]["template"]["spec"]["containers"]:
        for key in ("readinessProbe", "livenessProbe"):
            yield key, container[key]["httpGet"]


def test_kubernetes_manifests():
    """Deployments for CPU and FPGA nodes (the latter pinned by a node selector) whose probes
    ask for the v2 health endpoints, on the port the container serves and the Service
    targets; the Service selects both."""
    paths = route_paths()
    documents = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            documents[(document["kind"], document["metadata"]["name"])] = document
    cpu, fpga = documents[("Deployment", "sparsa-cpu")], documents[("Deployment", "sparsa-fpga")]
    service = documents[("Service", "sparsa")]
    assert fpga["spec"]["template"]["spec"]["nodeSelector"] == {
        "sparsa.io/accelerator": "pynq-z2"}
    assert "nodeSelector" not in cpu["spec"]["template"]["spec"]
    for deployment in (cpu, fpga):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = container["ports"][0]
        assert port["containerPort"] == 8000 and port["name"] == \
            service["spec"]["ports"][0]["targetPort"]
        found = {key: probe["path"] for key, probe in probes(deployment)}
        assert found == {"readinessProbe": "/v2/health/ready",
                         "livenessProbe": "/v2/health/live"}
        assert set(found.values()) <= paths
        assert deployment["spec"]["template"]["metadata"]["annotations"][
            "prometheus.io/path"] in paths
    args = fpga["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--backend") + 1] == "pynq" and "--fallback" in args
    # The arguments are sparsa serve's own.
    from sparsa import cli

    parser = cli.build_parser()
    for deployment in (cpu, fpga):
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        given = (["serve", "--host", "0.0.0.0", "--port", "8000"] + container["args"]
                 if "command" not in container else ["serve"] + container["args"])
        assert parser.parse_args(given).command == "serve"


def test_compose_nginx_prometheus_docker():
    """The compose file's servers are nginx's upstream and Prometheus' targets; nginx
    proxies the v2 paths; the image's entry point is sparsa serve on port 8000 with a health
    check on the ready endpoint."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    servers = sorted(name for name in compose["services"] if name.startswith("sparsa-"))
    assert len(servers) >= 2
    nginx = (DEPLOY / "nginx.conf").read_text()
    upstream = re.findall(r"server (sparsa-\d+):8000", nginx)
    assert sorted(upstream) == servers and "location /v2/" in nginx
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == [f"{name}:8000" for name in servers]
    assert prometheus["scrape_configs"][0]["metrics_path"] in route_paths()
    docker = (DEPLOY / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (.*)$", docker, re.M).group(1))
    assert entry[:2] == ["sparsa", "serve"] and entry[entry.index("--port") + 1] == "8000"
    assert "/v2/health/ready" in docker and "EXPOSE 8000" in docker
    # The extras it installs (by default, and with sim) are the package's.
    import tomllib

    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    default = re.search(r"^ARG EXTRAS=(\S+)$", docker, re.M).group(1).split(",")
    assert "serve" in default and set(default) | {"sim"} <= extras
    grafana = compose["services"]["grafana"]["volumes"]
    provisioning = DEPLOY / "grafana" / "provisioning"
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    dashboards = yaml.safe_load((provisioning / "dashboards" / "sparsa.yaml").read_text())
    folder = dashboards["providers"][0]["options"]["path"]
    assert any(v.startswith("./grafana/sparsa.json:" + folder) for v in grafana)
    assert any(v.startswith("./grafana/provisioning:/etc/grafana/provisioning") for v in grafana)
    from sparsa import cli

    command = compose["services"][servers[0]]["command"]
    assert cli.build_parser().parse_args(entry[1:] + command).command == "serve"


def test_grafana_dashboard_reads_exported_metrics():
    """Every metric the dashboard's queries name is one the server exports."""
    registry = metrics.Metrics().registry
    exported = set()
    for family in registry.collect():
        exported.add(family.name)
        for suffix in ("_total", "_bucket", "_sum", "_count"):
            exported.add(family.name + suffix)
    dashboard = json.loads((DEPLOY / "grafana" / "sparsa.json").read_text())
    named = {name for panel in dashboard["panels"] for target in panel["targets"]
             for name in re.findall(r"sparsa_\w+", target["expr"])}
    assert named and named <= exported, named - exported
    assert {"sparsa_requests_total", "sparsa_device_busy_seconds_total",
            "sparsa_batch_size_sum", "sparsa_fallbacks_total", "sparsa_instance_up"} <= named


def test_two_servers_share_a_client(tmp_path_factory):
    """A fleet: two sparsa serve processes, one client sending alternately to each; every
    answer exact, each server counts its half."""
    httpclient = pytest.importorskip("tritonclient.http")
    pytest.importorskip("onnxruntime")
    sys.path.insert(0, str(Path(__file__).parent))
    import test_serve

    path = test_serve.compiled_cnn(tmp_path_factory.mktemp("fleet"))
    servers = [test_serve.start([path, "--backend", "reference"]) for _ in range(2)]
    try:
        clients = [httpclient.InferenceServerClient(f"127.0.0.1:{port}")
                   for _, port in servers]
        x = test_serve.images(8, seed=6)
        got = []
        for row in range(8):
            given = httpclient.InferInput("x", [1, 1, 8, 8], "FP32")
            given.set_data_from_numpy(x[row:row + 1])
            got.append(clients[row % 2].infer("cnn", [given]).as_numpy("prob"))
        assert np.array_equal(np.concatenate(got), test_serve.expected(path, x))
        for client, (_, port) in zip(clients, servers):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as page:
                text = page.read().decode()
            assert 'sparsa_requests_total{model="cnn",outcome="success"} 4.0' in text
            client.close()
    finally:
        for process, _ in servers:
            process.terminate()
            assert process.wait(timeout=60) == 0
