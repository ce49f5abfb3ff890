#!/usr/bin/env bash
# Checkpoint loading against the disk's own read rate (issue 3: "loads at disk speed"), on the GPU
# host: writes a random-weight checkpoint of a preset's shapes (tools/make_hf_checkpoint.py:
# transformers' save_pretrained, 5 GB shards),
# drops its pages from the page cache (sync + POSIX_FADV_DONTNEED, no root needed; `fincore` shows
# what stayed), then times
#   1. dd of every shard in turn (what one sequential reader gets from this disk),
#   2. dd of all shards at once (what parallel readers get),
#   3. gemma2-run --backend cuda loading it cold (progress on stderr, GB/s),
#   4. the same warm (every page cached: the loader's own ceiling), and dd warm beside it.
#   tools/load_speed.sh PRESET OUT_DIR     (PRESET: 2b, 9b, 27b; gemma2-run on PATH)
set -uo pipefail
preset=$1 out=$2 dir=${LOAD_SPEED_DIR:-/tmp/gemma2-load-speed}
mkdir -p "$out"
elapsed() { awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $1}"; }
rm -rf "$dir"
t0=$(date +%s.%N)
python3 "$(dirname "$0")/make_hf_checkpoint.py" --preset "$preset" --out "$dir" || exit 1
sync
echo "wrote $(du -sb "$dir" | cut -f1) bytes in $(elapsed "$t0") s"
drop() {
  sync
  python3 - "$dir"/*.safetensors <<'PY'
import os, sys
for p in sys.argv[1:]:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
  fincore "$dir"/*.safetensors 2>/dev/null || true
}
drop
echo "== dd, cold"
t0=$(date +%s.%N)
for f in "$dir"/*.safetensors; do dd if="$f" of=/dev/null bs=16M status=none; done
bytes=$(cat "$dir"/*.safetensors | wc -c)
s=$(elapsed "$t0")
echo "dd: $bytes bytes in $s s = $(awk "BEGIN{printf \"%.2f\", $bytes / $s / 1e9}") GB/s"
run() {
  local t0 s; t0=$(date +%s.%N)
  gemma2-run --backend cuda --model "$dir" --prompt-ids 2,651,6037 --max-new-tokens 2 --progress \
    --kv-cache-gb 4 > "$out/run_$1.json" 2> "$out/run_$1.err"
  local rc=$?
  s=$(elapsed "$t0")
  tr '\r' '\n' < "$out/run_$1.err" | tail -3
  echo "gemma2-run $1: rc=$rc, whole process $s s"
}
drop
echo "== dd, cold, every shard at once"
t0=$(date +%s.%N)
for f in "$dir"/*.safetensors; do dd if="$f" of=/dev/null bs=16M status=none & done
wait
s=$(elapsed "$t0")
echo "dd parallel: $bytes bytes in $s s = $(awk "BEGIN{printf \"%.2f\", $bytes / $s / 1e9}") GB/s"
drop
echo "== gemma2-run, cold"
run cold
echo "== gemma2-run, warm"
run warm
t0=$(date +%s.%N)
for f in "$dir"/*.safetensors; do dd if="$f" of=/dev/null bs=16M status=none; done
s=$(elapsed "$t0")
echo "dd warm: $bytes bytes in $s s = $(awk "BEGIN{printf \"%.2f\", $bytes / $s / 1e9}") GB/s"
rm -rf "$dir"
