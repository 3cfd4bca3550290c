#!/usr/bin/env bash
# Set up podipc, then run a producer/consumer pair over every channel this host offers and compare their summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
podipc=.venv/bin/podipc
spool=$(mktemp -d /tmp/podipc-demo.XXXXXX)
trap 'rm -rf "$spool"' EXIT
$podipc channels
for url in tcp://127.0.0.1:7000 "udp://127.0.0.1:7001" "unix://$spool/podipc.sock" unix://@podipc-demo \
           mq:///podipc-demo sysvmq://podipc-demo shm:///podipc-demo "file://$spool/spool" \
           zmq+tcp://127.0.0.1:7002 "zmq+ipc://$spool/zmq.sock"; do
  rate=(); [[ $url == udp* ]] && rate=(--rate 5000)
  size=1000; [[ $url == mq* || $url == sysvmq* ]] && size=8000
  $podipc consume "$url" > "$spool/consumer.json" &
  consumer=$!
  $podipc produce "$url" --count 2000 --random --size "$size" "${rate[@]}" > "$spool/producer.json"
  wait "$consumer"
  python3 - "$spool/producer.json" "$spool/consumer.json" <<'PY'
import json, sys
produced, consumed = (json.loads(open(path).read().splitlines()[-1]) for path in sys.argv[1:])
same = (produced["messages"], produced["sha256"]) == (consumed["messages"], consumed["sha256"])
print(f'{produced["url"]:<46} {consumed["messages"]:>6} messages {consumed["bytes"]:>10} bytes  '
      f'sha256 {consumed["sha256"][:16]}  {"match" if same else "MISMATCH"}')
sys.exit(0 if same or produced["url"].startswith("udp") else 1)
PY
done
