#!/usr/bin/env bash
# Set up podipc, then run a producer/consumer pair over every channel this host offers and compare their summaries.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
podipc=.venv/bin/podipc
spool=$(mktemp -d /tmp/podipc-demo.XXXXXX)
trap 'rm -rf "$spool"' EXIT
$podipc channels
# One line per usable channel (from the transports' descriptors): URL, largest random size, lossy or not.
pairs=$(.venv/bin/python - "$spool" <<'PY'
import itertools, sys
import podipc
from podipc.transport import AddressForm, transport_for
ports = itertools.count(7000)
for row in podipc.channels():
    if not row.usable:
        continue
    transport = transport_for(row.scheme)
    size = min(1000 if row.max_message_size > 8192 else 8000, row.max_message_size)
    url = transport.fresh_url(row.scheme, "podipc-demo", lambda: f"{sys.argv[1]}/{row.transport}", lambda _: next(ports))
    print(url, size, "lossy" if not transport.reliable else "reliable")
    if transport.schemes[row.scheme] is AddressForm.SOCKET_PATH_OR_ABSTRACT:
        print(f"{row.scheme}://@podipc-demo", size, "reliable")
PY
)
while read -r url size kind; do
  rate=(); [[ $kind == lossy ]] && rate=(--rate 5000)
  $podipc consume "$url" < /dev/null > "$spool/consumer.json" &
  consumer=$!
  $podipc produce "$url" --count 2000 --random --size "$size" "${rate[@]}" < /dev/null > "$spool/producer.json"
  wait "$consumer"
  python3 - "$spool/producer.json" "$spool/consumer.json" "$kind" <<'PY'
import json, sys
produced, consumed = (json.loads(open(path).read().splitlines()[-1]) for path in sys.argv[1:3])
same = (produced["messages"], produced["sha256"]) == (consumed["messages"], consumed["sha256"])
print(f'{produced["url"]:<46} {consumed["messages"]:>6} messages {consumed["bytes"]:>10} bytes  '
      f'sha256 {consumed["sha256"][:16]}  {"match" if same else "MISMATCH"}')
sys.exit(0 if same or sys.argv[3] == "lossy" else 1)
PY
done <<< "$pairs"
