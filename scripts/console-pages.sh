#!/bin/bash
# How long the web console's pages take with a fleet behind them: starts
# keyward (release build) on a fresh data dir, registers N agents, has H of
# them enroll a client certificate and ask for a signature their role holds
# for two approvers, signs in to the console and fetches each page 21 times
# with curl. Prints each page's median and worst time and its size.
#   cargo build --release && N=1000 H=100 scripts/console-pages.sh
set -e
BIN=${BIN:-target/release/keyward}
N=${N:-1000}; H=${H:-100}
D=$(mktemp -d /tmp/kw-scale.XXXX); chmod 700 $D
PORT=${PORT:-19443}; URL=https://127.0.0.1:$PORT
$BIN serve --data-dir $D --listen 127.0.0.1:$PORT > $D/log 2>&1 & S=$!
trap "kill $S" EXIT
for i in $(seq 60); do [ -f $D/admin.token ] && curl -sf --cacert $D/ca.pem $URL/healthz >/dev/null && break; sleep 0.5; done
T=$(cat $D/admin.token)
api() { curl -s --cacert $D/ca.pem -H "Authorization: Bearer $T" -H 'Content-Type: application/json' "$@"; }
api $URL/v1/policies -d '{"content":"[roles.payments]\nactions = [\"sign\"]\nrequires_approval = true\napprovals_required = 2\n"}' >/dev/null
start=$(date +%s.%N)
seq 1 $N | xargs -P 8 -I{} curl -s -o /dev/null --cacert $D/ca.pem -H "Authorization: Bearer $T" -H 'Content-Type: application/json' $URL/v1/agents -d '{"name":"agent-{}","scopes":["payments"]}'
echo "registered $N agents in $(echo "$(date +%s.%N) - $start" | bc) s"
# Held requests: the admin signs for the agent (admin sign is held by the agent's role too?)
hold() {
  i=$1; a=agent-$i
  tok=$(api $URL/v1/agents/$a/enrollment-tokens -d '{}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["token"])')
  openssl ecparam -name prime256v1 -genkey -noout -out $D/$a.key 2>/dev/null
  openssl req -new -key $D/$a.key -subj /CN=$a -out $D/$a.csr 2>/dev/null
  python3 -c 'import json,sys;print(json.dumps({"token":sys.argv[1],"csr_pem":open(sys.argv[2]).read()}))' "$tok" $D/$a.csr > $D/$a.req
  curl -s --cacert $D/ca.pem -H 'Content-Type: application/json' --data-binary @$D/$a.req $URL/v1/enroll | python3 -c 'import json,sys;d=json.load(sys.stdin);print(d["certificate_pem"])' > $D/$a.pem
  curl -s -o /dev/null -w '%{http_code} ' --cacert $D/ca.pem --cert $D/$a.pem --key $D/$a.key -H 'Content-Type: application/json' $URL/v1/agents/$a/sign -d '{"message_b64":"cGF5IDEwIHRvIGJvYg=="}'
}
for i in $(seq 1 $H); do hold $i; done | tr ' ' '\n' | sort | uniq -c
C=$(curl -s -D - -o /dev/null --cacert $D/ca.pem -X POST --data-urlencode "token=$T" $URL/ui/login | grep -i set-cookie | sed 's/.*\(__Host[^;]*\).*/\1/')
for p in /ui/ /ui/approvals /ui/approvals/rows /ui/agents /ui/anomalies "/ui/audit" /ui/policy; do
  times=$(for i in $(seq 21); do curl -s -o /dev/null -w '%{time_total}\n' --cacert $D/ca.pem -H "Cookie: $C" -H 'Sec-Fetch-Mode: navigate' "$URL$p"; done | sort -n)
  med=$(echo "$times" | sed -n 11p); max=$(echo "$times" | tail -1)
  size=$(curl -s --cacert $D/ca.pem -H "Cookie: $C" "$URL$p" | wc -c)
  echo "$p median ${med}s max ${max}s ${size} bytes"
done
