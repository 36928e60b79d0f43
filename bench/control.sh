#!/usr/bin/env bash
# The control plane's fan-out: the time from `Apply` returning to the last
# of N subscribers having ACKed the new version, p50 and p99 over 50
# changes, for N = 100 and 1,000, and the control plane's resident memory
# and CPU time over the changes. Each subscriber is a light client in one
# bench process (crates/ferry-control/examples/control_fanout.rs) with a
# connection and a node certificate of its own, as a node has; it ACKs a
# snapshot as soon as it arrives, so the figure is the control plane's
# fan-out, not a node's apply. Loopback only; a fresh `ferry control`
# with the file store for each N.
#
#   bench/control.sh                     # N = 100 and 1000, 50 changes each
#   SUBSCRIBERS="100" CHANGES=20 bench/control.sh
#
# Targets (issue 10): p99 <= 100 ms at N = 100, <= 500 ms at N = 1,000.
set -euo pipefail
cd "$(dirname "$0")/.."

SUBSCRIBERS=${SUBSCRIBERS:-"100 1000"}
CHANGES=${CHANGES:-50}

cargo build --release -q -p ferry --bin ferry
cargo build --release -q -p ferry-control --example control_fanout
ferry=target/release/ferry
fanout=target/release/examples/control_fanout
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

$ferry cert init "$work/ca" >/dev/null
$ferry cert issue --ca "$work/ca" --role control bench-control --host 127.0.0.1 --out "$work/control" >/dev/null
$ferry cert issue --ca "$work/ca" --role admin bench --out "$work/admin" >/dev/null

for n in $SUBSCRIBERS; do
  rm -rf "$work/store"
  $ferry control --listen 127.0.0.1:0 --store "file:$work/store" \
    --ca "$work/ca/ca.crt" --cert "$work/control/bench-control.crt" --key "$work/control/bench-control.key" \
    --admin 127.0.0.1:0 >"$work/control.out" 2>"$work/control.log" &
  pid=$!
  for _ in $(seq 1 100); do
    grep -q '^control ready' "$work/control.out" 2>/dev/null && break
    sleep 0.1
  done
  addr=$(awk '/^control grpc /{print $3}' "$work/control.out")
  [ -n "$addr" ] || { echo "ferry control did not start:"; cat "$work/control.log"; exit 1; }
  echo "== N = $n subscribers, $CHANGES changes"
  $fanout --control "https://$addr" --ca-dir "$work/ca" \
    --admin-cert "$work/admin/bench.crt" --admin-key "$work/admin/bench.key" \
    --config deploy/examples/ferry.toml --subscribers "$n" --changes "$CHANGES" --pid "$pid"
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
done
