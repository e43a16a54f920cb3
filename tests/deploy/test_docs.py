"""Every `dspark-node ...` command shown in the README, the operator and gateway guides and the deploy
READMEs parses with the real CLI: the docs cannot drift from the flags."""

from __future__ import annotations

import re
import shlex

import pytest
from deploy_helpers import DEPLOY, REPO

from node.cli import build_parser

DOCS = [REPO / "README.md", REPO / "docs" / "operator-guide.md", REPO / "docs" / "gateway.md",
        *sorted(DEPLOY.rglob("README.md"))]
_SHELL_STOP = {">", ">>", "|", "&&", "||", ";", "#"}


def shown_commands() -> list[tuple[str, list[str]]]:
    """(file, argv after `dspark-node`) for each command in the files' ```sh blocks."""
    found = []
    for path in DOCS:
        for block in re.findall(r"```sh\n(.*?)```", path.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                for i, word in enumerate(words):
                    # The program itself, not a unit or folder of that name: first word, after
                    # `docker compose exec node` / `kubectl exec ... --`, or by its install path.
                    if word.endswith("/bin/dspark-node") or (word == "dspark-node"
                                                              and (i == 0 or words[i - 1] in ("node", "--"))):
                        argv = []
                        for arg in words[i + 1:]:
                            if arg in _SHELL_STOP or arg.startswith(">"):
                                break
                            argv.append(arg)
                        found.append((path.name, argv))
    return found


def test_docs_show_commands():
    names = {argv[0] for _, argv in shown_commands()}
    assert {"doctor", "health", "submit", "receipts", "keys", "peers"} <= names


@pytest.mark.parametrize("source,argv", shown_commands(), ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_command_parses(source, argv):
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{source}: `dspark-node {' '.join(argv)}` does not parse (exit {exc.code})")
