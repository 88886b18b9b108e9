#!/bin/bash
# Two builds side by side in one run: `keyward bench sign --seconds S
# --json` alternately from A and B, N pairs, so that the machine's drift
# (these machines are shared) falls on both alike. One line per run, then
# each build's medians and B's median ratio to A's, per mode: rates are
# compared as fractions of the same run's raw C_Sign, and as absolutes.
#
# usage: scripts/bench-ab.sh A_BINARY B_BINARY [N] [SECONDS]
set -euo pipefail
A=$1; B=$2; N=${3:-5}; S=${4:-5}
out=$(mktemp); trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$N"); do
  for side in A B; do
    bin=$A; [ "$side" = B ] && bin=$B
    "$bin" bench sign --seconds "$S" --json 2>/dev/null | python3 -c "
import json, sys
r = {}
for line in sys.stdin:
    if line.startswith('{'):
        d = json.loads(line); r[d['mode']] = d
print(json.dumps({'side': '$side', 'run': $i, 'modes': r}))" >>"$out"
    tail -1 "$out" | python3 -c "
import json, sys
d = json.loads(sys.stdin.read()); r = d['modes']; raw = r['raw']['ops_per_sec']
print('%s run %d: raw %.0f/s | pool %.0f/s (%.2f) | http %.0f/s (%.2f) | http-half p99 %.1f ms' % (
    d['side'], d['run'], raw, r['pool']['ops_per_sec'], r['pool']['ops_per_sec'] / raw,
    r['http']['ops_per_sec'], r['http']['ops_per_sec'] / raw, r['http-half']['p99_us'] / 1000))"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(side, f):
    return statistics.median(f(r['modes']) for r in runs if r['side'] == side)
rows = [
    ('raw /s', lambda m: m['raw']['ops_per_sec']),
    ('pool /s', lambda m: m['pool']['ops_per_sec']),
    ('http /s', lambda m: m['http']['ops_per_sec']),
    ('pool / raw', lambda m: m['pool']['ops_per_sec'] / m['raw']['ops_per_sec']),
    ('http / raw', lambda m: m['http']['ops_per_sec'] / m['raw']['ops_per_sec']),
    ('http-half p99 ms', lambda m: m['http-half']['p99_us'] / 1000),
]
print('%-18s %12s %12s %8s' % ('median', 'A', 'B', 'B / A'))
for name, f in rows:
    a, b = med('A', f), med('B', f)
    print('%-18s %12.2f %12.2f %8.2f' % (name, a, b, b / a))
PY
