#!/usr/bin/env bash
# Installs the JavaScript clients server_test drives (the openai package, the Vercel AI SDK,
# LangChain JS) into tests/js from its package-lock.json. Node.js comes from the machine, or
# Debian when absent.
# Without network access the step warns and those tests report themselves skipped.
set -uo pipefail
dir=$(dirname "$0")/../tests/js
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "install-js-deps: installing Debian's nodejs and npm"
  sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
stamp=$dir/node_modules/.package-lock.json
if [[ -f $stamp && $stamp -nt $dir/package-lock.json ]]; then exit 0; fi
if ! (cd "$dir" && npm ci --no-audit --no-fund --silent >/dev/null 2>&1); then
  echo "install-js-deps: warning: npm ci failed in tests/js; the JavaScript client tests will be skipped"
fi
exit 0
