#!/bin/bash
# The tail as the database grows, from outside: a fresh `keyward serve` on
# its embedded defaults, one agent, then ROUNDS rounds of wrk at 32
# keep-alive connections for 8 s each, signing then issuing (about 50,000
# certificates a round). One line per round: rate, p50, p99 and p99/p50
# for each, and the certificates in the database so far.
#
# usage: scripts/wrk-growth.sh [BINARY] [PORT] [ROUNDS]   (needs wrk, sqlite3)
# KEEP=1 keeps the data directory and the server's log, and names it.
set -euo pipefail
BIN=${1:-target/release/keyward}; PORT=${2:-18500}; ROUNDS=${3:-4}
D=$(mktemp -d /tmp/kw-growth.XXXX); chmod 700 $D
$BIN serve --data-dir $D --listen 127.0.0.1:$PORT > $D/log 2>&1 &
PID=$!
for i in $(seq 1 50); do [ -f $D/admin.token ] && curl -sk https://127.0.0.1:$PORT/readyz >/dev/null 2>&1 && break; sleep 0.2; done
TOKEN=$(cat $D/admin.token)
curl -sk -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' -X POST https://127.0.0.1:$PORT/v1/agents -d '{"name":"alpha","scopes":["sign"]}' >/dev/null
cat > $D/sign.lua <<LUA
wrk.method = "POST"; wrk.body = '{"message_b64":"aGk="}'
wrk.headers["Content-Type"] = "application/json"; wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
cat > $D/issue.lua <<LUA
wrk.method = "POST"; wrk.body = '{"ttl_seconds":600}'
wrk.headers["Content-Type"] = "application/json"; wrk.headers["Authorization"] = "Bearer $TOKEN"
LUA
lat() { python3 -c "
import re,sys
t=sys.stdin.read()
def ms(s):
    m=re.search(r'\s'+s+r'%\s+([\d.]+)(us|ms|s)',t)
    v=float(m.group(1)); u=m.group(2)
    return v/1000 if u=='us' else v*1000 if u=='s' else v
r=re.search(r'Requests/sec:\s+([\d.]+)',t).group(1)
non='NON2XX' if 'Non-2xx' in t else ''
print(f'{float(r):.0f}/s p50 {ms(\"50\"):.2f} p99 {ms(\"99\"):.2f} ({ms(\"99\")/ms(\"50\"):.1f}x){non}')"; }
for r in $(seq 1 $ROUNDS); do
  s=$(wrk -t1 -c32 -d8s --latency -s $D/sign.lua https://127.0.0.1:$PORT/v1/agents/alpha/sign 2>&1 | lat)
  i=$(wrk -t1 -c32 -d8s --latency -s $D/issue.lua https://127.0.0.1:$PORT/v1/agents/alpha/certificates 2>&1 | lat)
  n=$(sqlite3 $D/keyward.db "select count(*) from certificates" 2>/dev/null)
  echo "$(date +%T) round $r: sign $s | issue $i | certs $n"
done
kill $PID; wait $PID 2>/dev/null || true
if [ -n "${KEEP:-}" ]; then echo "kept: $D"; else rm -rf $D; fi
