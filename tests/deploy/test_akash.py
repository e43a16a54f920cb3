"""The Akash SDL: the fields a GPU lease needs, and Akash's own validator (the SDL schema and
semantic checks of @akashnetwork/chain-sdk, run with node) when it is installed."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, REPO, config_from_env, env_pairs

SDL_PATH = DEPLOY / "akash" / "deploy.yaml"
SDK_VERSION = "1.0.0-alpha.25"
INSTALL = (f"npm install --no-save --no-audit --no-fund --prefix .cache/akash-sdk "
           f"@akashnetwork/chain-sdk@{SDK_VERSION}")
VALIDATE_JS = """
const { validateSDL, SDL } = require("@akashnetwork/chain-sdk");
const data = JSON.parse(require("fs").readFileSync(0, "utf8"));
const errors = validateSDL(data, "mainnet") || [];
const groups = errors.length ? [] : new SDL(data, "beta3", "mainnet").groups();
console.log(JSON.stringify({ errors: errors.map(e => e.message), groups: groups.length }));
"""


def sdl() -> dict:
    return yaml.safe_load(SDL_PATH.read_text())


@pytest.fixture(scope="module")
def akash_validate():
    modules = Path(os.environ.get("DSPARK_AKASH_SDK", REPO / ".cache" / "akash-sdk")) / "node_modules"
    node = shutil.which("node")
    if node is None or not (modules / "@akashnetwork" / "chain-sdk").is_dir():
        reason = f"Akash SDL validator not installed (node and `{INSTALL}`); check skipped"
        print(reason)
        pytest.skip(reason)

    def validate(data: dict) -> dict:
        result = subprocess.run([node, "-e", VALIDATE_JS], input=json.dumps(data), capture_output=True, text=True,
                                timeout=60, env={**os.environ, "NODE_PATH": str(modules)})
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)
    return validate


def test_akash_validator_accepts_it_and_builds_the_lease_group(akash_validate):
    assert akash_validate(sdl()) == {"errors": [], "groups": 1}


def test_akash_validator_rejects_a_broken_copy(akash_validate):
    broken = copy.deepcopy(sdl())
    del broken["profiles"]["placement"]["akash"]["pricing"]["node"]
    assert any("pricing" in message for message in akash_validate(broken)["errors"])


def test_gpu_is_nvidia_from_a_model_list():
    gpu = sdl()["profiles"]["compute"]["node"]["resources"]["gpu"]
    assert gpu["units"] >= 1
    models = gpu["attributes"]["vendor"]["nvidia"]
    assert models and all(isinstance(m["model"], str) and m["model"] for m in models)


def test_key_and_ledger_are_on_persistent_storage():
    doc = sdl()
    mounts = doc["services"]["node"]["params"]["storage"]
    (name,) = [n for n, spec in mounts.items() if spec["mount"] == "/data"]
    volumes = {v.get("name", "default"): v for v in doc["profiles"]["compute"]["node"]["resources"]["storage"]}
    assert volumes[name]["attributes"]["persistent"] is True
    assert doc["deployment"]["node"]["akash"]["count"] == 1  # one key, one ledger


def test_ports_are_exposed_globally():
    exposed = {e["port"]: e for e in sdl()["services"]["node"]["expose"]}
    assert set(exposed) == {7440, 7441, 7442}
    for entry in exposed.values():
        assert entry["proto"] == "tcp" and entry["to"] == [{"global": True}]


def test_pricing_placeholder_names_a_denom_and_amount():
    pricing = sdl()["profiles"]["placement"]["akash"]["pricing"]["node"]
    assert pricing["denom"] in ("uakt", "uact") or pricing["denom"].startswith("ibc/")
    assert int(pricing["amount"]) > 0


def test_environment_is_a_valid_node_config(monkeypatch):
    service = sdl()["services"]["node"]
    config = config_from_env(env_pairs(service["env"]), monkeypatch)
    assert config.dashboard.token and config.p2p.announce_grpc
    assert service["args"] == ["run"]
