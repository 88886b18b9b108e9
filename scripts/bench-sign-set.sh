#!/bin/bash
# Issue 13's "8 of 8" check: N runs of `keyward bench sign --seconds 5
# --json`, one line each with raw's rate and CPU per signature, pool's and
# http's ratios to raw, http-half's p99 and naive's rate, and OK when all
# three targets hold (pool >= 0.9 of raw, http >= 0.5, http-half p99 < 5 ms).
#
# usage: scripts/bench-sign-set.sh [N] [BINARY]
set -euo pipefail
N=${1:-8}; BIN=${2:-target/release/keyward}
for _ in $(seq 1 "$N"); do
  "$BIN" bench sign --seconds 5 --json 2>/dev/null | python3 -c "
import json, sys
r = {}
for line in sys.stdin:
    if line.startswith('{'):
        d = json.loads(line); r[d['mode']] = d
raw = r['raw']['ops_per_sec']
ok = (r['pool']['ops_per_sec'] >= 0.9 * raw and r['http']['ops_per_sec'] >= 0.5 * raw
      and r['http-half']['p99_us'] < 5000)
print('raw %.0f/s %dus | pool %.2f | http %.2f | half p99 %.1f ms | naive %.0f/s | %s' % (
    raw, r['raw']['cpu_us_per_op'], r['pool']['ops_per_sec'] / raw,
    r['http']['ops_per_sec'] / raw, r['http-half']['p99_us'] / 1000,
    r['naive']['ops_per_sec'], 'OK' if ok else 'MISS'))"
done
