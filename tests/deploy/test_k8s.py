"""Kubernetes manifests: strict validation against the Kubernetes schemas bundled by
kubernetes-validate, and the fields this node needs (GPU, one replica, probes, volume, ports)."""

from __future__ import annotations

import copy

import pytest
from deploy_helpers import DEPLOY, config_from_env, load_yaml_documents

from node.commands import health as health_command

K8S = DEPLOY / "k8s"


def resources() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_documents(path):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


@pytest.fixture(scope="module")
def kv():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (test extra) not installed")


def test_every_resource_passes_strict_schema_validation(kv):
    docs = resources()
    assert {kind for kind, _ in docs} == {"Deployment", "Service", "PersistentVolumeClaim"}
    for (kind, name), doc in docs.items():
        kv.validate(doc, kv.latest_version(), strict=True)  # raises, naming the bad field


def test_the_validator_rejects_a_misspelt_field(kv):
    doc = copy.deepcopy(resources()[("Deployment", "dspark-node")])
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, kv.latest_version(), strict=True)


def node_container() -> dict:
    pod = resources()[("Deployment", "dspark-node")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def test_one_replica_recreated_on_a_gpu():
    deployment = resources()[("Deployment", "dspark-node")]
    assert deployment["spec"]["replicas"] == 1  # one key, one ledger
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    res = node_container()["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) >= 1
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]


def test_runs_as_the_image_user_without_privileges():
    pod = resources()[("Deployment", "dspark-node")]["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 10001 and security["fsGroup"] == 10001
    container_security = node_container()["securityContext"]
    assert container_security["allowPrivilegeEscalation"] is False
    assert container_security["capabilities"]["drop"] == ["ALL"]


def test_data_volume_is_the_claim():
    pod = resources()[("Deployment", "dspark-node")]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in node_container()["volumeMounts"]}
    assert claims[mounts["/data"]] == "dspark-node-data"
    assert ("PersistentVolumeClaim", "dspark-node-data") in resources()


def test_probes_run_the_health_command():
    container = node_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        argv = container[probe]["exec"]["command"]
        assert argv[:3] == ["python", "-m", "node.commands.health"]
        args = health_command.standalone_parser().parse_args(argv[3:])
        assert (args.grpc.port, args.tls) == (7440, "auto")
        # the probe's own timeout must not be shorter than the command's
        assert container[probe]["timeoutSeconds"] >= args.timeout


def test_services_route_to_the_named_container_ports():
    container = node_container()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named == {"grpc": 7440, "http": 7441, "p2p": 7442}
    labels = resources()[("Deployment", "dspark-node")]["spec"]["template"]["metadata"]["labels"]
    public = resources()[("Service", "dspark-node")]
    internal = resources()[("Service", "dspark-node-http")]
    for service in (public, internal):
        assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in public["spec"]["ports"]} == {"grpc", "p2p"}
    assert internal["spec"]["type"] == "ClusterIP" and [p["targetPort"] for p in internal["spec"]["ports"]] == ["http"]


def test_environment_is_a_valid_node_config(monkeypatch):
    env = {}
    for var in node_container()["env"]:
        env[var["name"]] = var.get("value", "a-dashboard-token-from-the-secret")
    config = config_from_env(env, monkeypatch)
    assert config.dashboard.token and config.p2p.announce_grpc
