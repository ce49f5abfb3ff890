#!/usr/bin/env bash
# Installs the Debian packages the build and tests need; does nothing when all are present.
# Usage: tools/install-deps.sh   (as root, or with sudo available)
set -euo pipefail
packages=(
  cmake ninja-build g++ ccache pkg-config     # build
  clang libclang-rt-14-dev                    # libFuzzer target (clang -fsanitize=fuzzer)
  libopenblas-dev                             # CPU backend matrix products
  libsentencepiece-dev sentencepiece          # tokenizer (+ spm_train for the demo checkpoint)
  libspdlog-dev nlohmann-json3-dev libcli11-dev
  libgloo-dev                                 # collectives between cpu worker processes (TCP)
  libssl-dev                                  # HMAC-SHA256 of the control plane's cluster-secret handshake
  libucx-dev                                  # control plane between coordinator and workers
  libboost-dev                                # Asio + Beast: the HTTP API, gemma2-client
  curl                                        # the HTTP API tests use curl as a real client
  iproute2                                    # the two-node test (network namespaces)
  libgtest-dev libgmock-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
echo "install-deps: installing ${missing[*]}"
sudo=""; [[ $(id -u) == 0 ]] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
