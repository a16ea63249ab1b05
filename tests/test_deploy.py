"""deploy/ agrees with the code: ports, probe paths, commands, config keys, grace periods.

Docker and Kubernetes do not run here: every file is parsed (YAML, TOML, the Dockerfile
as text) and held against what the bridge really serves, reads and accepts.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import tomllib
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from bridge import cli
from bridge.broker import free_port
from bridge.config import CONFIG_ENV, Config, parse_config
from bridge.dev import demo_accounts
from bridge.kafka import Producer
from bridge.metrics import Metrics
from bridge.probes import create_probe_app
from bridge.receiver import Readiness, create_app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
URL = re.compile(r"https?://[^\s'\"]+")
EMBEDDED_BROKER = ("calfkit", "dev-broker")


# -- reading the files -------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions, (INSTRUCTION, arguments), continuations joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    lines = (line.strip() for line in joined.splitlines())
    found = []
    for line in lines:
        if line and not line.startswith("#"):
            instruction, _, arguments = line.partition(" ")
            found.append((instruction.upper(), arguments.strip()))
    return found


def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's build stages, each from its FROM on."""
    found: list[list[tuple[str, str]]] = []
    for instruction, arguments in dockerfile():
        if instruction == "FROM":
            found.append([])
        if found:
            found[-1].append((instruction, arguments))
    return found


def docker_value(instruction: str) -> str:
    values = [arguments for name, arguments in dockerfile() if name == instruction]
    assert len(values) == 1, f"{instruction}: {values}"
    return values[0]


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def kustomization() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return data


def k8s_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the kustomization's resources, by (kind, name)."""
    objects = {}
    for resource in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / resource).read_text()):
            objects[doc["kind"], doc["metadata"]["name"]] = doc
    return objects


def references(value: Any, prefix: str) -> Iterator[str]:
    """Every `env:`/`file:` reference (by `prefix`) in a TOML document, without the prefix."""
    if isinstance(value, dict):
        for item in value.values():
            yield from references(item, prefix)
    elif isinstance(value, list):
        for item in value:
            yield from references(item, prefix)
    elif isinstance(value, str) and value.startswith(prefix):
        yield value.removeprefix(prefix)


def with_files(value: Any, local: Callable[[str], Path]) -> Any:
    """The TOML document with each `file:PATH` pointing at `local(PATH)` instead."""
    if isinstance(value, dict):
        return {key: with_files(item, local) for key, item in value.items()}
    if isinstance(value, list):
        return [with_files(item, local) for item in value]
    if isinstance(value, str) and value.startswith("file:"):
        return f"file:{local(value.removeprefix('file:'))}"
    return value


def routes(app: Any) -> set[str]:
    return {route.path for route in app.routes}


async def not_ready() -> Readiness:
    return Readiness(["not running"], [])


def receiver_routes(config: Config) -> set[str]:
    return routes(create_app(config, Producer(config.kafka), Metrics(), not_ready))


PROBE_ROUTES = routes(create_probe_app(Metrics(), not_ready))


def is_command(name: str, capsys: pytest.CaptureFixture[str]) -> bool:
    """Whether `order-bridge NAME` exists: its --help exits 0, an unknown command 2."""
    with pytest.raises(SystemExit) as exited:
        cli.main([name, "--help"])
    capsys.readouterr()
    return exited.value.code == 0


def url_of(healthcheck: list[str] | str) -> urllib.parse.SplitResult:
    text = healthcheck if isinstance(healthcheck, str) else " ".join(healthcheck)
    found: list[str] = URL.findall(text)
    assert len(found) == 1, text
    return urllib.parse.urlsplit(found[0])


# -- the image -------------------------------------------------------------------------


def test_the_image_is_built_in_two_stages_from_a_slim_python() -> None:
    builds = stages()
    assert len(builds) >= 2
    default = dict(
        arguments.split("=", 1)
        for name, arguments in dockerfile()
        if name == "ARG" and "=" in arguments
    )
    for stage in builds:
        base = stage[0][1].split()[0]
        base = re.sub(r"\$\{(\w+)\}", lambda m: default[m.group(1)], base)
        assert re.fullmatch(r"python:3\.1[1-9]-slim", base), base
    build, final = builds[0], builds[-1]
    assert any("pip wheel" in arguments for name, arguments in build if name == "RUN")
    # The final stage installs the wheels only: no compiler, no package manager run.
    installs = [arguments for name, arguments in final if name == "RUN"]
    assert any(re.search(r"pip install .*--no-index .*order-bridge\b", a) for a in installs)
    assert not any(re.search(r"apt-get|apk |gcc|build-essential", a) for a in installs)
    assert not any(name == "COPY" and "--from" not in arguments for name, arguments in final)


def test_the_image_leaves_out_the_embedded_broker() -> None:
    for name, arguments in dockerfile():
        assert not any(word in arguments for word in EMBEDDED_BROKER), (name, arguments)
        # No extras at all: `order-bridge[...]` or `.[...]`.
        if name == "RUN" and "pip" in arguments:
            assert "[" not in arguments, arguments
    # ...and without extras, nothing brings it along.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("calfkit") for d in project["dependencies"])


def test_the_image_runs_order_bridge_as_a_user_with_its_config_by_path(
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = docker_value("USER")
    assert user.split(":")[0] not in ("root", "0")
    env = dict(re.findall(r"(\w+)=(\S+)", docker_value("ENV")))
    assert env[CONFIG_ENV] == "/etc/order-bridge/bridge.toml"
    assert yaml.safe_load(docker_value("ENTRYPOINT")) == ["order-bridge"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "order-bridge" in scripts
    [command] = yaml.safe_load(docker_value("CMD"))
    assert command == "serve"
    assert is_command(command, capsys)


def test_the_image_health_check_asks_healthz_on_the_http_port() -> None:
    check = docker_value("HEALTHCHECK")
    # Exec form, Python's own urllib: the slim image has no curl.
    command = yaml.safe_load(check.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    url = url_of(check)
    config = compose_config()
    assert url.path == "/healthz"
    assert url.path in receiver_routes(config)
    assert url.port == config.http.port
    exposed = {int(port) for port in docker_value("EXPOSE").split()}
    assert {config.http.port, config.worker.http_port} <= exposed


# -- docker compose ----------------------------------------------------------------------


def compose_secret_file(service: dict[str, Any], path: str) -> Path:
    """The file behind compose's /run/secrets/NAME in `service`."""
    mounted = PurePosixPath(path)
    assert mounted.parent == PurePosixPath("/run/secrets"), path
    assert mounted.name in service["secrets"], f"{mounted.name} not given to the service"
    file: str = compose()["secrets"][mounted.name]["file"]
    return DEPLOY / file


def compose_config(service: str = "worker") -> Config:
    """The compose config as `service` reads it, its secrets from deploy/secrets."""
    spec = compose()["services"][service]
    [mount] = spec["configs"]
    source = DEPLOY / compose()["configs"][mount["source"]]["file"]
    data = tomllib.loads(source.read_text())
    assert not list(references(data, "env:")), "compose gives the bridge no variables"
    local = with_files(data, lambda path: compose_secret_file(spec, path))
    return parse_config(local, env={})


def test_compose_runs_kafka_in_kraft_mode() -> None:
    kafka = compose()["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "KAFKA_ZOOKEEPER_CONNECT" not in env
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{env['KAFKA_NODE_ID']}@kafka:9093"
    assert "healthcheck" in kafka
    advertised = urllib.parse.urlsplit(env["KAFKA_ADVERTISED_LISTENERS"].split(",")[0])
    for service in ("receiver", "worker"):
        config = compose_config(service)
        assert config.kafka.bootstrap_servers == f"{advertised.hostname}:{advertised.port}"
        assert config.kafka.replication_factor == 1
        assert compose()["services"][service]["depends_on"]["kafka"] == {
            "condition": "service_healthy"
        }


@pytest.mark.parametrize(("service", "command"), [("receiver", "receiver"), ("worker", "worker")])
def test_compose_bridge_services_agree_with_the_config(
    service: str, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = compose()["services"][service]
    assert spec["command"] == [command]
    assert is_command(command, capsys)
    [mount] = spec["configs"]
    assert mount["target"] == dict(re.findall(r"(\w+)=(\S+)", docker_value("ENV")))[CONFIG_ENV]
    config = compose_config(service)
    port = config.http.port if service == "receiver" else config.worker.http_port
    served = receiver_routes(config) if service == "receiver" else PROBE_ROUTES
    [published] = spec["ports"]
    assert int(published.rsplit(":", 1)[1]) == port
    health = url_of(spec["healthcheck"]["test"])
    assert (health.path, health.port) == ("/healthz", port)
    assert health.path in served
    assert config.http.host == "0.0.0.0"  # inside a container


def test_compose_worker_stops_after_its_drain_timeout() -> None:
    grace = compose()["services"]["worker"]["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace.removesuffix("s")) > compose_config().worker.drain_timeout


def test_compose_accounts_are_the_sandbox_demo_accounts() -> None:
    sandbox = compose()["services"]["sandbox"]
    script = sandbox["entrypoint"][-1]
    port = int(re.search(r"port=(\d+)", script).group(1))  # type: ignore[union-attr]
    assert [int(p.rsplit(":", 1)[1]) for p in sandbox["ports"]] == [port]
    config = compose_config()
    demo = {account.name: account for account in demo_accounts()}
    assert {account.name for account in config.accounts} == demo.keys()
    for account in config.accounts:
        url = urllib.parse.urlsplit(account.base_url)
        assert (url.hostname, url.port, url.path) == ("sandbox", port, f"/{account.provider}")
        # Same credentials as the sandbox checks: the worker's queries get answers.
        assert account.settings == demo[account.name].settings
    assert compose()["services"]["worker"]["depends_on"]["sandbox"] == {
        "condition": "service_healthy"
    }


def test_compose_sandbox_command_serves_the_sandbox() -> None:
    """The sandbox service's own command, on a free loopback port, answers its health check."""
    sandbox = compose()["services"]["sandbox"]
    assert sandbox["entrypoint"][:2] == ["python", "-c"]
    port = free_port()
    script = re.sub(r"port=\d+", f"port={port}", sandbox["entrypoint"][2])
    script = script.replace('"0.0.0.0"', '"127.0.0.1"')
    health = url_of(sandbox["healthcheck"]["test"])
    url = health._replace(netloc=f"127.0.0.1:{port}").geturl()
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, f"{shlex.quote(script)} never answered"
                time.sleep(0.1)
        assert answer.status_code == 200
    finally:
        process.terminate()
        process.wait(10)
        if process.stderr:
            process.stderr.close()


# -- Kubernetes --------------------------------------------------------------------------


def generator(kind: str, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [g for g in kustomization()[kind] if g["name"] == name]
    assert len(found) == 1, f"{kind} {name}"
    return found[0]


def secret_keys() -> set[str]:
    """The keys of the credentials Secret, as secrets.env.example lists them."""
    [envs] = generator("secretGenerator", "order-bridge-credentials")["envs"]
    example = (K8S / f"{envs}.example").read_text()
    return {
        line.split("=", 1)[0]
        for line in example.splitlines()
        if "=" in line and not line.startswith("#")
    }


def k8s_toml() -> dict[str, Any]:
    [source] = generator("configMapGenerator", "order-bridge-config")["files"]
    return tomllib.loads((K8S / source).read_text())


def k8s_config(tmp_path: Path) -> Config:
    """The ConfigMap's config with dummy credentials in place of the Secret's."""
    data = k8s_toml()

    def local(path: str) -> Path:
        copy = tmp_path / PurePosixPath(path).name
        copy.write_text("dummy-credential\n")
        return copy

    env = {name: "dummy-credential" for name in references(data, "env:")}
    return parse_config(with_files(data, local), env=env)


def container(kind_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Deployment's pod spec and its one container."""
    deployment = k8s_objects()["Deployment", kind_name]
    pod = deployment["spec"]["template"]["spec"]
    [main] = pod["containers"]
    return pod, main


@pytest.mark.parametrize("name", ["order-bridge-receiver", "order-bridge-worker"])
def test_k8s_deployments_mount_the_config_and_credentials(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pod, main = container(name)
    assert is_command(main["args"][0], capsys)
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_env = dict(re.findall(r"(\w+)=(\S+)", docker_value("ENV")))[CONFIG_ENV]
    [source] = generator("configMapGenerator", "order-bridge-config")["files"]
    config_volume = next(n for n, v in volumes.items() if "configMap" in v)
    assert volumes[config_volume]["configMap"]["name"] == "order-bridge-config"
    assert f"{mounts[config_volume]}/{source}" == config_env
    # Every file: reference is a key of the Secret, mounted where the config looks.
    secret_volume = next(n for n, v in volumes.items() if "secret" in v)
    assert volumes[secret_volume]["secret"]["secretName"] == "order-bridge-credentials"
    data = k8s_toml()
    for path in references(data, "file:"):
        mounted = PurePosixPath(path)
        assert str(mounted.parent) == mounts[secret_volume], path
        assert mounted.name in secret_keys(), path
    # Every env: reference is a variable taken from the Secret.
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in main.get("env", [])}
    for variable in references(data, "env:"):
        assert env[variable]["name"] == "order-bridge-credentials"
        assert env[variable]["key"] in secret_keys()
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_config_parses(tmp_path: Path) -> None:
    config = k8s_config(tmp_path)
    assert config.http.host == "0.0.0.0"  # inside a pod
    assert config.kafka.sasl_password is not None


def container_port(main: dict[str, Any]) -> int:
    [port] = main["ports"]
    number: int = port["containerPort"]
    return number


def test_k8s_receiver_ports_and_probes_agree_with_the_config(tmp_path: Path) -> None:
    config = k8s_config(tmp_path)
    served = receiver_routes(config)
    _, main = container("order-bridge-receiver")
    port = container_port(main)
    assert port == config.http.port
    assert (
        main["livenessProbe"]["httpGet"]["path"],
        main["readinessProbe"]["httpGet"]["path"],
    ) == (
        "/healthz",
        "/readyz",
    )
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"]["port"] == port
        assert main[probe]["httpGet"]["path"] in served
    objects = k8s_objects()
    labels = objects["Deployment", "order-bridge-receiver"]["spec"]["template"]["metadata"]
    service = objects["Service", "order-bridge-receiver"]["spec"]
    [service_port] = service["ports"]
    assert service_port["targetPort"] == port
    assert service["selector"].items() <= labels["labels"].items()
    worker_labels = objects["Deployment", "order-bridge-worker"]["spec"]["template"]["metadata"]
    assert not service["selector"].items() <= worker_labels["labels"].items()
    budget = objects["PodDisruptionBudget", "order-bridge-receiver"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels["labels"].items()
    scaler = objects["HorizontalPodAutoscaler", "order-bridge-receiver"]["spec"]
    assert scaler["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "order-bridge-receiver",
    }
    assert main["resources"]["requests"]["cpu"]  # the autoscaler's measure
    assert_scraped(labels["annotations"], port, served)


def test_k8s_worker_agrees_with_the_config(tmp_path: Path) -> None:
    config = k8s_config(tmp_path)
    pod, main = container("order-bridge-worker")
    port = container_port(main)
    assert port == config.worker.http_port
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    assert {"/healthz", "/readyz"} <= PROBE_ROUTES
    deployment = k8s_objects()["Deployment", "order-bridge-worker"]
    assert deployment["spec"]["replicas"] <= config.kafka.partitions
    assert pod["terminationGracePeriodSeconds"] > config.worker.drain_timeout
    assert_scraped(deployment["spec"]["template"]["metadata"]["annotations"], port, PROBE_ROUTES)


def assert_scraped(annotations: dict[str, str], port: int, served: set[str]) -> None:
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    assert annotations["prometheus.io/path"] == "/metrics"
    assert "/metrics" in served
