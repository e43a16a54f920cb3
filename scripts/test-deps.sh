#!/usr/bin/env bash
# System tools some tests drive: Chromium (dashboard, Playwright), promtool (metrics format),
# and Akash's SDL validator (npm). Tests skip with a printed reason when one cannot be installed.
set -uo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
    >/dev/null 2>&1 || echo "test-deps: could not install ${need[*]}; their tests will be skipped" >&2
fi
if command -v npm >/dev/null && [ ! -d .cache/akash-sdk/node_modules/@akashnetwork/chain-sdk ]; then
  npm install --no-save --no-audit --no-fund --silent --prefix .cache/akash-sdk \
    @akashnetwork/chain-sdk@1.0.0-alpha.25 >/dev/null 2>&1 \
    || echo "test-deps: could not install the Akash SDL validator; its test will be skipped" >&2
fi
exit 0
