#!/bin/bash
# Two builds side by side in one run: `keyward bench KIND --seconds S
# --json` from A and B, N pairs, each in a random order, so that the
# machine's drift (these machines are shared) falls on both alike. One line per run, then
# each build's medians and B's median ratio to A's, per mode: rates are
# compared as fractions of the same run's raw C_Sign, and as absolutes;
# the half-load modes by their p99.
#
# MODES (e.g. MODES=http-issue) runs only those modes. Work a build does
# in the background (sealing the audit log) spills into whichever mode
# runs next; alone, a mode carries all of it, as under sustained load.
#
# usage: [MODES=a,b] scripts/bench-ab.sh A_BINARY B_BINARY [N] [SECONDS] [sign|issue]
set -euo pipefail
A=$1; B=$2; N=${3:-5}; S=${4:-5}; KIND=${5:-sign}
out=$(mktemp); trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$N"); do
  # Each pair in a random order: in a fixed one, whatever a run leaves
  # behind (page cache, files being freed) falls on the next side always.
  for side in $(printf 'A\nB\n' | shuf); do
    bin=$A; [ "$side" = B ] && bin=$B
    "$bin" bench "$KIND" --seconds "$S" --json ${MODES:+--modes "$MODES"} 2>/dev/null | python3 -c "
import json, sys
r = {}
for line in sys.stdin:
    if line.startswith('{'):
        d = json.loads(line); r[d['mode']] = d
print(json.dumps({'side': '$side', 'run': $i, 'modes': r}))" >>"$out"
    tail -1 "$out" | python3 -c "
import json, sys
d = json.loads(sys.stdin.read()); r = d['modes']; raw = r.get('raw', {}).get('ops_per_sec')
parts = ['raw %.0f/s' % raw] if raw else []
for mode, m in r.items():
    if mode == 'raw': continue
    if mode.endswith('-half'):
        parts.append('%s p99 %.1f ms' % (mode, m['p99_us'] / 1000))
    else:
        parts.append('%s %.0f/s' % (mode, m['ops_per_sec']) + (' (%.2f)' % (m['ops_per_sec'] / raw) if raw else ''))
print('%s run %d: %s' % (d['side'], d['run'], ' | '.join(parts)))"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(side, f):
    return statistics.median(f(r['modes']) for r in runs if r['side'] == side)
modes = [m for m in runs[0]['modes'] if m != 'raw']
has_raw = 'raw' in runs[0]['modes']
rows = [('raw /s', lambda m: m['raw']['ops_per_sec'])] if has_raw else []
for mode in modes:
    if mode.endswith('-half'):
        rows.append(('%s p99 ms' % mode, lambda m, mode=mode: m[mode]['p99_us'] / 1000))
    else:
        rows.append(('%s /s' % mode, lambda m, mode=mode: m[mode]['ops_per_sec']))
        if has_raw:
            rows.append(('%s / raw' % mode,
                         lambda m, mode=mode: m[mode]['ops_per_sec'] / m['raw']['ops_per_sec']))
print('%-24s %12s %12s %8s' % ('median', 'A', 'B', 'B / A'))
for name, f in rows:
    a, b = med('A', f), med('B', f)
    print('%-24s %12.2f %12.2f %8.2f' % (name, a, b, b / a))
PY
