#!/usr/bin/env bash
# Installs the official openai npm package into tests/js (from its package-lock.json) so that
# server_test can use it as a real client. Node.js comes from the machine, or Debian when absent.
# Without network access the step warns and that one test reports itself skipped.
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
  echo "install-js-deps: warning: npm ci failed in tests/js; the openai npm client test will be skipped"
fi
exit 0
