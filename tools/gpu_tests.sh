#!/usr/bin/env bash
# Runs every GPU test (ctest label `gpu`) on the GPU host from a bundle made here:
#
#   cmake --build build && ../shared/gpu/bundle.sh .gpu build/bin/tests   # on this machine
#   source .gpu/env.sh && tools/gpu_tests.sh                              # on the GPU host
#
# The same programs skip with one line where no GPU is present (as in `make test`).
set -uo pipefail
bin=${GEMMA2_TEST_BIN:-$(dirname "$(command -v cuda_ops_test 2>/dev/null || echo build/bin/tests/x)")}
status=0
for t in gpu_smoke_test cuda_ops_test reference_cuda_test nccl_collective_test; do
  echo "== $t"
  # A hung kernel must not eat the session's device time: each program gets a bound.
  timeout --signal=KILL "${GEMMA2_TEST_TIMEOUT:-300}" "$bin/$t" "$@" || status=1
done
exit $status
