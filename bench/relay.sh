#!/usr/bin/env bash
# Accepted and delivered messages per second through one Ferry worker and
# through Postfix 3.7 configured as the same relay, measured in the same
# run: the same load from postfix's smtp-source (one session per message,
# 4 KiB each), the same next hop (postfix's smtp-sink), on loopback only.
# Prints each figure and the ratio Ferry/Postfix.
#
#   bench/relay.sh                 # N=5000 messages per run, 16 and 100 sessions
#   N=20000 ROUNDS=3 bench/relay.sh
#
# Installs postfix from Debian's packages if smtp-source is missing, and
# reconfigures the local Postfix to listen on 127.0.0.1:2701 only, relaying
# everything to the sink (fsync on, as shipped). Run it as root on a
# machine you can spare.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-5000}
ROUNDS=${ROUNDS:-1}
SIZE=4096
SINK=127.0.0.1:2600
FERRY_PORT=2700
POSTFIX_PORT=2701
LIMIT=300   # seconds any one run may take

if ! command -v smtp-source >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postfix >/dev/null
fi
cargo build --release -q
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  postfix stop >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# Ferry: one worker, one anonymous connector that may relay, one route.
cat >"$work/ferry.toml" <<TOML
[[connectors]]
name = "Bench"
port = $FERRY_PORT
remote_ranges = ["127.0.0.0/8"]
permissions = ["anonymous", "accept_any_recipient"]
limits = { max_connections_per_source = 5000 }

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["$SINK"]
tls = "none"

# A message deferred by a hiccup of the sink is retried at once, not in
# the default 5 minutes (the run would wait for it).
[delivery]
retry_interval = "1s"
TOML
target/release/ferry worker --config "$work/ferry.toml" --listen 127.0.0.1 \
  --data "$work/ferry-data" --admin 127.0.0.1:0 --hostname bench.test \
  >"$work/ferry.out" 2>"$work/ferry.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "worker ready" "$work/ferry.out" && break; sleep 0.1; done

# Postfix: the same relay (shipped defaults, fsync on), enough processes
# for 100 sessions.
postfix stop >/dev/null 2>&1 || true
postconf -e "inet_interfaces = 127.0.0.1" "inet_protocols = ipv4" \
  "mynetworks = 127.0.0.0/8" "relayhost = [127.0.0.1]:${SINK#*:}" \
  "mydestination =" "myhostname = bench.test" "default_process_limit = 200" \
  "smtpd_relay_restrictions = permit_mynetworks, reject" "maillog_file = /var/log/postfix-bench.log"
postconf -M "127.0.0.1:$POSTFIX_PORT/inet=127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
postfix start >/dev/null 2>&1 || { echo "postfix did not start: see /var/log/postfix-bench.log" >&2; exit 1; }
sleep 1

now() { date +%s.%N; }

# run NAME PORT SESSIONS -> prints "accepted delivered" (msg/s)
run() {
  local port=$2 sessions=$3
  smtp-sink -u nobody -M "$N" "$SINK" 1024 >/dev/null 2>&1 &
  local sink=$!
  sleep 0.2
  local t0 t1 t2
  t0=$(now)
  timeout "$LIMIT" smtp-source -s "$sessions" -l "$SIZE" -m "$N" \
    -f load@example.test -t rcpt@sink.test "127.0.0.1:$port"
  t1=$(now)
  if ! timeout "$LIMIT" tail --pid="$sink" -f /dev/null; then
    kill "$sink" 2>/dev/null || true
    echo "0 0"; return
  fi
  t2=$(now)
  awk -v n="$N" -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "%.0f %.0f\n", n/(b-a), n/(c-a) }'
}

printf "%-8s %-9s %12s %12s\n" sessions system accepted/s delivered/s
for round in $(seq "$ROUNDS"); do
  for s in 16 100; do
    read -r fa fd < <(run ferry "$FERRY_PORT" "$s")
    printf "%-8s %-9s %12s %12s\n" "$s" ferry "$fa" "$fd"
    read -r pa pd < <(run postfix "$POSTFIX_PORT" "$s")
    printf "%-8s %-9s %12s %12s\n" "$s" postfix "$pa" "$pd"
    awk -v s="$s" -v fa="$fa" -v fd="$fd" -v pa="$pa" -v pd="$pd" \
      'BEGIN { printf "%-8s %-9s %11.2fx %11.2fx\n", s, "ratio", (pa>0?fa/pa:0), (pd>0?fd/pd:0) }'
  done
done
