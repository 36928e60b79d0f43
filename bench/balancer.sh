#!/usr/bin/env bash
# Ferry's balancer against HAProxy 2.6 (mode tcp), measured in the same
# run with the same load from postfix's smtp-source (one message of 4 KiB
# per session), on loopback only:
#   1. pure forwarding to postfix's smtp-sink, PROXY off on both;
#   2. in front of a Ferry worker, PROXY v2 on both (HAProxy: send-proxy-v2,
#      option smtpchk), the worker relaying to the same sink.
# Prints sessions per second, CPU seconds per 1000 sessions of each
# balancer process, and connect-to-banner latency p50/p99 (direct, via
# HAProxy, via Ferry). Both balancers log one line per session to a file
# (HAProxy: option tcplog to stdout; Ferry: its log on stderr).
#
#   bench/balancer.sh               # N=5000 sessions per run, 16 and 100 at once
#   N=20000 ROUNDS=3 bench/balancer.sh
#   FERRY_BIN=../old/target/release/ferry bench/balancer.sh   # another build
#
# Installs postfix (for smtp-source and smtp-sink) and haproxy from
# Debian's packages if missing. Run it on a machine you can spare.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-5000}
ROUNDS=${ROUNDS:-1}
LATENCY_N=${LATENCY_N:-2000}
SIZE=4096
SINK=2610 WORKER=2611 FERRY_SINK=2620 FERRY_WORKER=2621 HAPROXY_SINK=2630 HAPROXY_WORKER=2631
LIMIT=300

need=()
command -v smtp-source >/dev/null || need+=(postfix)
command -v haproxy >/dev/null || need+=(haproxy)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# FERRY_BIN: another build to measure; by default this tree's.
FERRY_BIN=${FERRY_BIN:-target/release/ferry}
[ "$FERRY_BIN" = target/release/ferry ] && cargo build --release -q
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

smtp-sink -u nobody -c "127.0.0.1:$SINK" 1024 >/dev/null 2>&1 &
pids+=($!)

cat >"$work/ferry.toml" <<TOML
trusted_proxies = ["127.0.0.1/32"]

[[connectors]]
name = "Bench"
port = $WORKER
remote_ranges = ["0.0.0.0/0"]
permissions = ["anonymous", "accept_any_recipient"]
limits = { max_connections_per_source = 5000 }

[[routes]]
domains = ["*"]
type = "smtp"
next_hops = ["127.0.0.1:$SINK"]
tls = "none"

[delivery]
retry_interval = "1s"

[balancer]
allow = ["127.0.0.0/8"]
max_connections_per_source = 5000

[[balancer.listeners]]
name = "sink"
port = $FERRY_SINK
backend_port = $SINK
proxy_protocol = false

[[balancer.listeners]]
name = "worker"
port = $FERRY_WORKER
backend_port = $WORKER

[[balancer.backends]]
name = "local"
address = "127.0.0.1"
TOML
echo "bench-admin-token-$$-$RANDOM" >"$work/admin.token"
"$FERRY_BIN" worker --config "$work/ferry.toml" --listen 127.0.0.1 \
  --admin-token-file "$work/admin.token" \
  --data "$work/worker" --admin 127.0.0.1:0 --hostname bench.test \
  >"$work/worker.out" 2>"$work/worker.log" &
pids+=($!)
"$FERRY_BIN" balancer --config "$work/ferry.toml" --listen 127.0.0.1 \
  --admin 127.0.0.1:0 >"$work/balancer.out" 2>"$work/balancer.log" &
ferry_pid=$!
pids+=($ferry_pid)

cat >"$work/haproxy.cfg" <<CFG
global
  maxconn 8000
  log stdout format raw local0
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend sink
  bind 127.0.0.1:$HAPROXY_SINK
  default_backend sink
backend sink
  server sink 127.0.0.1:$SINK
frontend worker
  bind 127.0.0.1:$HAPROXY_WORKER
  default_backend worker
backend worker
  option smtpchk EHLO bench.test
  server worker 127.0.0.1:$WORKER send-proxy-v2 check inter 1s
CFG
haproxy -db -f "$work/haproxy.cfg" >"$work/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=($haproxy_pid)

for f in worker.out balancer.out; do
  for _ in $(seq 100); do grep -q " ready" "$work/$f" && break; sleep 0.1; done
done
sleep 2

now() { date +%s.%N; }
# CPU seconds of a process (all its threads) so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.3f", ($14 + $15) / hz }' "/proc/$1/stat"; }

# run PORT SESSIONS PID -> "sessions/s cpu_s_per_1000"
run() {
  local port=$1 sessions=$2 pid=$3 c0 c1 t0 t1
  c0=$( [ "$pid" = - ] && echo 0 || cpu "$pid")
  t0=$(now)
  timeout "$LIMIT" smtp-source -s "$sessions" -l "$SIZE" -m "$N" \
    -f load@bench.test -t rcpt@sink.test "127.0.0.1:$port"
  t1=$(now)
  c1=$( [ "$pid" = - ] && echo 0 || cpu "$pid")
  awk -v n="$N" -v a="$t0" -v b="$t1" -v c0="$c0" -v c1="$c1" \
    'BEGIN { printf "%.0f %.3f\n", n / (b - a), (c1 - c0) * 1000 / n }'
}

# Waits (bounded) until the worker's queue is empty, so that its delivery
# does not run into the next measurement.
worker_admin=$(sed -n 's|^worker admin http://\([^/ ]*\).*|\1|p' "$work/worker.out")
settle() {
  for _ in $(seq "$LIMIT"); do
    "$FERRY_BIN" queue --admin "$worker_admin" --token-file "$work/admin.token" list 2>/dev/null | tail -1 | grep -q '^0 messages' && return
    sleep 1
  done
}

printf "%-22s %-9s %12s %20s\n" backend sessions "sessions/s" "CPU s/1000 sessions"
for round in $(seq "$ROUNDS"); do
  for s in 16 100; do
    read -r r _ < <(run "$SINK" "$s" -)
    printf "%-22s %-9s %12s %20s\n" "sink, direct" "$s" "$r" "-"
    read -r hr hc < <(run "$HAPROXY_SINK" "$s" "$haproxy_pid")
    printf "%-22s %-9s %12s %20s\n" "sink, via HAProxy" "$s" "$hr" "$hc"
    read -r fr fc < <(run "$FERRY_SINK" "$s" "$ferry_pid")
    printf "%-22s %-9s %12s %20s\n" "sink, via Ferry" "$s" "$fr" "$fc"
    awk -v s="$s" -v hr="$hr" -v fr="$fr" -v hc="$hc" -v fc="$fc" 'BEGIN {
      printf "%-22s %-9s %11.2fx %19.2fx\n", "Ferry/HAProxy", s, fr / hr, (hc > 0 ? fc / hc : 0) }'
    settle
    read -r hr hc < <(run "$HAPROXY_WORKER" "$s" "$haproxy_pid")
    printf "%-22s %-9s %12s %20s\n" "worker, via HAProxy" "$s" "$hr" "$hc"
    settle
    read -r fr fc < <(run "$FERRY_WORKER" "$s" "$ferry_pid")
    printf "%-22s %-9s %12s %20s\n" "worker, via Ferry" "$s" "$fr" "$fc"
    awk -v s="$s" -v hr="$hr" -v fr="$fr" -v hc="$hc" -v fc="$fc" 'BEGIN {
      printf "%-22s %-9s %11.2fx %19.2fx\n", "Ferry/HAProxy", s, fr / hr, (hc > 0 ? fc / hc : 0) }'
    settle
  done
done
echo "(ratios: Ferry/HAProxy; for CPU, lower is better for Ferry)"

echo
printf "%-22s %10s %10s\n" "connect to banner" "p50 us" "p99 us"
# Interleaved: every round connects once to each, in turn.
python3 bench/banner_latency.py "$LATENCY_N" \
  "direct=127.0.0.1:$SINK" "via HAProxy=127.0.0.1:$HAPROXY_SINK" "via Ferry=127.0.0.1:$FERRY_SINK" \
  "worker, via HAProxy=127.0.0.1:$HAPROXY_WORKER" "worker, via Ferry=127.0.0.1:$FERRY_WORKER"
